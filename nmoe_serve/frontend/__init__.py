"""The front end shared by the offline API (nmoe_serve.LLM) and the HTTP ingress: request
validation, the fan-out of prompts × n samples into engine requests, detokenization and stop
strings, and OpenAI's response shapes."""
