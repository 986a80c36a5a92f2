"""Tokenizer.apply_chat_template: the tiny DeepSeek-V3-style template, the sandbox and its errors."""

import pytest

from nmoe_serve.tokenizer import TINY_BOS_ID, Tokenizer
from nmoe_serve.tokenizer.tiny import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the train go?"},
    {"role": "assistant", "content": "To the coast."},
    {"role": "user", "content": "When?"},
]


def test_conversation_with_generation_prompt(tiny):
    text = tiny.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        f"{BOS_TOKEN}Be brief.{USER_TOKEN}Where does the train go?"
        f"{ASSISTANT_TOKEN}To the coast.{EOS_TOKEN}{USER_TOKEN}When?{ASSISTANT_TOKEN}"
    )


def test_conversation_without_generation_prompt(tiny):
    text = tiny.apply_chat_template(CONVERSATION[:3], add_generation_prompt=False, tokenize=False)
    assert (
        text
        == f"{BOS_TOKEN}Be brief.{USER_TOKEN}Where does the train go?{ASSISTANT_TOKEN}To the coast.{EOS_TOKEN}"
    )


def test_system_messages_are_joined_up_front(tiny):
    messages = [
        {"role": "system", "content": "One. "},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Two."},
    ]
    text = tiny.apply_chat_template(messages, tokenize=False)
    assert text == f"{BOS_TOKEN}One. Two.{USER_TOKEN}hi{ASSISTANT_TOKEN}"


def test_tokenized_has_one_bos(tiny):
    ids = tiny.apply_chat_template(CONVERSATION)
    text = tiny.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tiny.encode(text, add_special_tokens=False)
    assert ids[0] == TINY_BOS_ID
    assert ids.count(TINY_BOS_ID) == 1
    assert ids[-1] == tiny.encode(ASSISTANT_TOKEN, add_special_tokens=False)[0]


def test_unknown_role_is_rejected_by_template(tiny):
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    with pytest.raises(ValueError, match=r"chat template rejected the messages: unknown message role tool"):
        tiny.apply_chat_template(messages)


def test_no_chat_template(make_checkpoint):
    tokenizer = Tokenizer.from_pretrained(make_checkpoint(chat_template=None))
    with pytest.raises(
        ValueError, match=r"has no chat_template.*send a plain prompt to the completions endpoint"
    ):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", r"messages must be a list of dicts, got str"),
        ({"role": "user"}, r"messages must be a list of dicts, got dict"),
        ([], r"messages is empty; send at least one message"),
        (
            [{"role": "user", "content": "hi"}, "hi"],
            r"messages\[1\] must be a dict with 'role' and 'content', got str",
        ),
        ([{"content": "hi"}], r"messages\[0\] needs a string 'role', got None"),
        (
            [{"role": "user", "content": "a"}, {"role": "user"}],
            r"messages\[1\] \(role 'user'\) needs a string 'content'",
        ),
        (
            [{"role": "user", "content": ["part"]}],
            r"messages\[0\] \(role 'user'\) needs a string 'content', got list",
        ),
    ],
)
def test_malformed_messages(tiny, messages, message):
    with pytest.raises(ValueError, match=message):
        tiny.apply_chat_template(messages)


def test_extra_variable_colliding_with_builtin(tiny):
    with pytest.raises(ValueError, match=r"extra template variables \['bos_token'\] collide"):
        tiny.apply_chat_template(CONVERSATION, bos_token="x")


@pytest.fixture
def template_tokenizer(make_checkpoint):
    """Load the tiny checkpoint with a chat template of the test's choosing."""

    def load(template: str) -> Tokenizer:
        return Tokenizer.from_pretrained(make_checkpoint(chat_template=template))

    return load


def test_tojson_keeps_non_ascii(template_tokenizer):
    tokenizer = template_tokenizer("{{ messages | tojson }}|{{ tools | tojson(sort_keys=true) }}")
    tools = [{"name": "météo", "city": "東京"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "日本 <b>"}], tokenize=False, tools=tools
    )
    assert text == '[{"role": "user", "content": "日本 <b>"}]|[{"city": "東京", "name": "météo"}]'


def test_extra_variables_and_special_tokens_reach_template(template_tokenizer):
    tokenizer = template_tokenizer("{{ bos_token }}{{ greeting }}{{ eos_token }}{{ add_generation_prompt }}")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False, tokenize=False, greeting="hello"
    )
    assert text == f"{BOS_TOKEN}hello{EOS_TOKEN}False"


def test_trim_and_lstrip_blocks(template_tokenizer):
    tokenizer = template_tokenizer(
        "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n[{{ message['content'] }}]\n"
        "    {% endif %}\n{% endfor %}"
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
    )
    assert text == "[a]\n[b]\n"


def test_loop_controls(template_tokenizer):
    tokenizer = template_tokenizer(
        "{% for message in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ message['content'] }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "first"


def test_sandbox_blocks_attribute_escape(template_tokenizer):
    tokenizer = template_tokenizer("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match=r"chat template rejected the messages: .*unsafe"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sandbox_is_immutable(template_tokenizer):
    tokenizer = template_tokenizer("{{ messages.append(1) }}")
    with pytest.raises(ValueError, match=r"chat template rejected the messages: .*unsafe"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
