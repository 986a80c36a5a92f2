"""A tiny, deterministic DeepSeek-V3-style tokenizer for random test checkpoints.

The tokenizer is byte-level BPE like DeepSeek-V3's: 256 byte tokens, merges learned by a
small pure-Python trainer on an embedded English corpus, then DeepSeek-V3's special tokens.
Everything is built from constants in this file, so two calls write byte-identical files on
any machine.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from collections import Counter
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from nmoe_serve.tokenizer.tokenizer import Tokenizer

TINY_VOCAB_SIZE = 512
"""Number of tokens in the tiny tokenizer, special tokens included."""

NUM_BYTE_TOKENS = 256
NUM_MERGED_TOKENS = 240

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
TOOL_CALLS_BEGIN_TOKEN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END_TOKEN = "<｜tool▁calls▁end｜>"
THINK_BEGIN_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"

NAMED_SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    TOOL_CALLS_BEGIN_TOKEN,
    TOOL_CALLS_END_TOKEN,
    THINK_BEGIN_TOKEN,
    THINK_END_TOKEN,
)
NUM_RESERVED_TOKENS = TINY_VOCAB_SIZE - NUM_BYTE_TOKENS - NUM_MERGED_TOKENS - len(NAMED_SPECIAL_TOKENS)
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + tuple(f"<｜reserved_{i}｜>" for i in range(NUM_RESERVED_TOKENS))

FIRST_SPECIAL_ID = NUM_BYTE_TOKENS + NUM_MERGED_TOKENS
TINY_BOS_ID = FIRST_SPECIAL_ID + SPECIAL_TOKENS.index(BOS_TOKEN)
"""Id of `<｜begin▁of▁sentence｜>` in the tiny tokenizer."""
TINY_EOS_ID = FIRST_SPECIAL_ID + SPECIAL_TOKENS.index(EOS_TOKEN)
"""Id of `<｜end▁of▁sentence｜>` in the tiny tokenizer."""

TINY_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' }}{{ message['content'] }}{{ '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('unknown message role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
"""DeepSeek-V3-style chat template: BOS, system text, then User/Assistant turns."""

TRAINING_CORPUS = """\
The morning train to the coast leaves at seven, and most of the people on it are still half asleep.
A woman by the window reads the weather report out loud to nobody in particular. Rain is coming in
from the west, she says, and it will stay for the rest of the week. The man across from her nods and
goes back to his crossword. Outside, the fields turn from green to grey as the clouds roll over them.

In the kitchen of a small house near the station, a boy is learning to bake bread. His grandmother
shows him how to mix the flour with water and salt, how long to knead the dough, and how to tell when
it has risen enough. The first loaf comes out flat and hard. The second one is better. By the third,
the whole house smells warm, and the boy is proud of the golden crust he made with his own hands.

Numbers are everywhere once you start to look for them. There are 12 months in a year, 7 days in a
week, 24 hours in a day and 60 minutes in an hour. A good cup of tea takes about 4 minutes to brew.
The old clock in the hall strikes 3 times at three o'clock, and nobody has wound it since 1998.

The harbour is quiet in winter. Fishing boats rest against the wall, their ropes heavy with salt and
ice. A few gulls walk along the stones, looking for anything the fishermen have left behind. When the
sun comes out for a moment, the water turns from dark blue to silver, and then back again.

She opened the letter slowly, as if it might break. It was from her brother, who had moved to the
mountains many years ago. He wrote that the snow was deep this year, that the road to the village was
closed for weeks, and that he had read every book in the house twice. He asked if she would visit in
the spring, when the rivers run fast and the first flowers come up through the melting snow.

A garden needs patience more than anything else. You plant the seeds, you water them, and then you
wait. Some of them will grow tall and strong; others will never come up at all. The trick is to keep
going, to try again next season, and to learn a little more each time about the soil and the light.

The library on the corner opens at nine. Students come in with their bags and their coffee and find a
table near the heating. An old man reads the newspaper from the first page to the last, every single
day. The librarian knows all of their names, and she knows which books each of them will ask for.

When the storm finally arrived, it arrived all at once. The wind pulled at the trees and threw leaves
against the windows. The lights went out just after dinner, so the family sat together around a
candle and told stories about other storms they remembered. By morning the sky was clear and calm,
and the only sign of the night was a broken branch lying across the garden path.

Learning a new language is like walking into a dark room and slowly finding the walls. At first every
word is strange. Then a few words become familiar, then a few sentences, and one day you notice that
you have been thinking in the new language without trying. It is one of the best feelings there is.

The market on Saturday is loud and busy. People sell apples, cheese, honey, flowers and fresh fish.
Children run between the stalls while their parents count coins and argue about prices. At the end
of the day the square is empty again, except for a few boxes and the smell of bread and oranges.

He had always wanted to sail around the island, and this summer he finally did it. It took him four
days. On the first day the wind was perfect; on the second it died completely, and he waited for
hours in the middle of the sea. On the third night he saw more stars than he had ever seen before.
"""


def byte_to_unicode() -> dict[int, str]:
    """Map each byte to the printable character that stands for it in byte-level BPE tokens.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space and
    a few more) are shifted to code points from 256 upward, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    printable_set = set(printable)
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in printable_set:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def train_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn `num_merges` byte-level BPE merges on `corpus`; return (vocab, merges).

    Each step merges the most frequent adjacent pair of symbols; ties go to the pair that
    sorts first by code point, so the result never depends on hashing or dict order.
    Vocabulary ids: bytes 0-255 first (in byte order), then merged tokens in merge order.
    """
    byte_symbols = byte_to_unicode()
    vocab = {byte_symbols[byte]: byte for byte in range(256)}
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    word_counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(corpus))
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            raise ValueError(f"corpus too small: no pairs left to merge after {len(merges)} merges")
        best_pair = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best_pair)
        vocab.setdefault(best_pair[0] + best_pair[1], len(vocab))
        words = {merge_pair(symbols, best_pair): count for symbols, count in words.items()}
    return vocab, merges


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace each left-to-right occurrence of `pair` in `symbols` by the joined symbol."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_tiny_tokenizer() -> HFTokenizer:
    """Build the tiny byte-level BPE `tokenizers.Tokenizer` with its special tokens."""
    vocab, merges = train_bpe(TRAINING_CORPUS, NUM_MERGED_TOKENS)
    if len(vocab) != FIRST_SPECIAL_ID:
        raise ValueError(
            f"BPE training made {len(vocab)} distinct tokens, expected {FIRST_SPECIAL_ID}; "
            "a merge repeated an existing token, so change NUM_MERGED_TOKENS or the corpus"
        )
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, TINY_BOS_ID)],
    )
    return tokenizer


def added_token_entry(content: str) -> dict[str, object]:
    """`content` in the dict form that HF writes for an AddedToken in tokenizer_config.json."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


@cache
def tiny_tokenizer_files() -> Mapping[str, str]:
    """Contents of the tiny checkpoint's tokenizer files, keyed by file name."""
    tokenizer = build_tiny_tokenizer()
    if tokenizer.get_vocab_size(with_added_tokens=True) != TINY_VOCAB_SIZE:
        raise ValueError(
            f"tiny tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
            f"expected TINY_VOCAB_SIZE={TINY_VOCAB_SIZE}"
        )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token_entry(BOS_TOKEN),
        "eos_token": added_token_entry(EOS_TOKEN),
        "pad_token": added_token_entry(EOS_TOKEN),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    return MappingProxyType(
        {
            "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
        }
    )


def write_tiny_tokenizer(out_dir: pathlib.Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` of the tiny tokenizer into `out_dir`.

    The directory is created if missing. The files are identical on every call and every
    machine; the vocabulary has `TINY_VOCAB_SIZE` tokens, with BOS at `TINY_BOS_ID` and EOS at
    `TINY_EOS_ID`.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, content in tiny_tokenizer_files().items():
        (out_dir / file_name).write_text(content, encoding="utf-8")


def tiny_tokenizer() -> Tokenizer:
    """The tiny tokenizer, built in memory: the same as `Tokenizer.from_pretrained` on the files
    `write_tiny_tokenizer` writes, for processes that must not wait for a checkpoint on disk."""
    from nmoe_serve.tokenizer.tokenizer import Tokenizer

    return Tokenizer(
        HFTokenizer.from_str(tiny_tokenizer_files()["tokenizer.json"]),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=TINY_CHAT_TEMPLATE,
        source="the tiny tokenizer",
    )
