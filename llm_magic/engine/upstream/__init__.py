"""A backend in front of an OpenAI-compatible engine that already runs (vLLM, SGLang,
llama-server, Ollama, TGI, LM Studio, another llm_magic): ``llm-magic serve --engine URL``."""
