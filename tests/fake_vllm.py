#!/usr/bin/env python3
"""A stand-in for the ``vllm`` command (``LLM_MAGIC_VLLM`` points at it): it notes the arguments
it was given, then becomes a real OpenAI-compatible engine on the port asked for — llm_magic's
own server with the embedded model, which answers ``/health`` as vLLM does. With
``FAKE_VLLM_FAIL`` set it fails at start-up as vLLM does without a GPU."""

import json
import os
import sys

args = sys.argv[1:]
key = os.environ.get("VLLM_API_KEY", "")
if os.environ.get("FAKE_VLLM_ARGS"):
    with open(os.environ["FAKE_VLLM_ARGS"], "w") as f:
        json.dump({"args": args, "key": key}, f)
# vLLM echoes its settings, the key among them: the host must keep it out of its log
print("INFO 12-01 fake vllm: starting with", " ".join(args), "api_key:", key, flush=True)
if os.environ.get("FAKE_VLLM_FAIL"):
    print("RuntimeError: Failed to infer device type", flush=True)
    sys.exit(3)
port = args[args.index("--port") + 1]
model = args[1] if args[0] == "serve" else args[args.index("--model") + 1]
os.execv(sys.executable, [sys.executable, "-m", "llm_magic", "serve", "--no-token", "--port", port,  # as vLLM,
                          "--tunnel", "none", "--parallel", "2", "--ctx", "2048", "--model-name", model])  # its name
