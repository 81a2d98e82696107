"""Model specs, the allow-list, and hub downloads through the real huggingface_hub code
against a local stand-in for the hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_magic.errors import InvalidRequest, ModelNotAllowed, ModelNotFound
from llm_magic.models import ModelDownloadError, ModelPolicy, ModelSpec, embedded_model_path, resolve_model


@pytest.mark.parametrize("text, expected", [
    (None, ModelSpec()),
    ("", ModelSpec()),
    ("default", ModelSpec()),
    ("/models/x.gguf", ModelSpec(path="/models/x.gguf")),
    ("x.Q4_K_M.gguf", ModelSpec(path="x.Q4_K_M.gguf")),
    ("bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M",
     ModelSpec(repo_id="bartowski/Qwen2.5-7B-Instruct-GGUF", quant="Q4_K_M")),
    ("TheBloke/Llama-2-7B-Chat-GGUF:llama-2-7b-chat.Q4_K_M.gguf",
     ModelSpec(repo_id="TheBloke/Llama-2-7B-Chat-GGUF", filename="llama-2-7b-chat.Q4_K_M.gguf")),
    ("org/repo:*q8_0*.gguf", ModelSpec(repo_id="org/repo", filename="*q8_0*.gguf")),
    ("org/repo", ModelSpec(repo_id="org/repo")),
])
def test_spec_forms(text: str | None, expected: ModelSpec) -> None:
    assert ModelSpec.parse(text) == expected


def test_spec_round_trips_to_text() -> None:
    for text in ("org/repo:Q4_K_M", "org/repo:file.gguf", "org/repo", "/m/x.gguf"):
        assert str(ModelSpec.parse(text)) == text


@pytest.mark.parametrize("text", ["not a spec", "org/repo:", "just-a-name", "a/b/c:Q4"])
def test_bad_specs_say_what_a_spec_looks_like(text: str) -> None:
    with pytest.raises(InvalidRequest, match="REPO:QUANT"):
        ModelSpec.parse(text)


def test_embedded_model_is_the_smollm2_gguf() -> None:
    path = embedded_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_a_local_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"<html>not a model</html>")
    with pytest.raises(InvalidRequest, match="not a GGUF file"):
        resolve_model(ModelSpec(path=str(bogus)))
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(ModelSpec(path=str(tmp_path / "missing.gguf")))


# -- allow-list --------------------------------------------------------------------------------

HUB = ModelSpec.parse("bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M")


def test_default_model_is_always_allowed() -> None:
    for policy in (ModelPolicy(has_token=False), ModelPolicy(has_token=True, allow_patterns=["x/*"])):
        policy.check(ModelSpec())


def test_token_holder_may_load_hub_models_unless_patterns_restrict() -> None:
    ModelPolicy(has_token=True).check(HUB)
    ModelPolicy(has_token=True, allow_patterns=["bartowski/*"]).check(HUB)
    with pytest.raises(ModelNotAllowed, match="--allow-model"):
        ModelPolicy(has_token=True, allow_patterns=["TheBloke/*"]).check(HUB)


def test_without_token_only_default_and_patterns() -> None:
    with pytest.raises(ModelNotAllowed, match="without a token serves only its default model"):
        ModelPolicy(has_token=False).check(HUB)
    ModelPolicy(has_token=False, allow_patterns=["bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"]).check(HUB)


def test_request_cannot_read_local_files_without_a_pattern() -> None:
    with pytest.raises(ModelNotAllowed):
        ModelPolicy(has_token=True).check(ModelSpec(path="/etc/passwd.gguf"))
    ModelPolicy(has_token=True, allow_patterns=["/models/*.gguf"]).check(ModelSpec(path="/models/a.gguf"))


# -- hub downloads --------------------------------------------------------------------------------


def test_quant_spec_downloads_the_one_matching_file_into_the_hub_cache(hub, model_path: Path) -> None:
    path = resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:Q4_1"))
    assert path.name == "SmolLM2.Q4_1.gguf"  # not the mmproj file, though it matches Q4_1 too
    assert "models--test-org--SmolLM2-GGUF" in str(path)
    assert path.read_bytes() == model_path.read_bytes()
    downloads = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    assert downloads == ["/test-org/SmolLM2-GGUF/resolve/main/SmolLM2.Q4_1.gguf"]


def test_cached_model_is_not_downloaded_again(hub) -> None:
    first = resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))
    hub.requests.clear()
    again = resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))
    assert again == first
    assert not [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]


def test_seed_repo_and_glob_forms(hub) -> None:
    assert resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:*Q8_0*")).name == "SmolLM2.Q8_0.gguf"


def test_hf_token_is_sent_to_the_hub(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_gated_repos")
    resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))
    assert any(auth == "Bearer hf_secret_for_gated_repos" for _, _, auth in hub.requests)


def test_split_model_downloads_every_shard(hub) -> None:
    path = resolve_model(ModelSpec.parse("test-org/split-GGUF:Q4_K_M"))
    assert path.name == "big-Q4_K_M-00001-of-00002.gguf"
    assert (path.parent / "big-Q4_K_M-00002-of-00002.gguf").exists()


def test_unknown_repo(hub) -> None:
    with pytest.raises(ModelNotFound, match="no model repository 'test-org/nope'"):
        resolve_model(ModelSpec.parse("test-org/nope:Q4_K_M"))


def test_no_matching_file_lists_what_there_is(hub) -> None:
    with pytest.raises(ModelNotFound, match=r"no file in test-org/SmolLM2-GGUF matches 'Q2_K'.*SmolLM2\.Q4_1\.gguf, SmolLM2\.Q8_0\.gguf") as info:
        resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:Q2_K"))
    assert "README" not in str(info.value)


def test_several_matching_files_are_listed(hub) -> None:
    with pytest.raises(InvalidRequest, match=r"2 files .* match .*SmolLM2\.Q4_1\.gguf, SmolLM2\.Q8_0\.gguf"):
        resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.*.gguf"))


def test_repo_without_gguf_and_file_that_is_not_gguf(hub) -> None:
    with pytest.raises(ModelNotFound, match="holds no .gguf file"):
        resolve_model(ModelSpec.parse("test-org/empty:Q4_K_M"))
    with pytest.raises(InvalidRequest, match="not a GGUF file"):
        resolve_model(ModelSpec.parse("test-org/not-gguf:model.bin"))
    with pytest.raises(InvalidRequest, match="not a GGUF file"):
        resolve_model(ModelSpec.parse("test-org/not-gguf:fake.gguf"))


def test_missing_file_in_existing_repo(hub) -> None:
    with pytest.raises(ModelNotFound, match="has no file named nope.gguf"):
        resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:nope.gguf"))


def test_download_cut_half_way_resumes_and_gives_an_intact_file(hub, model_path: Path) -> None:
    hub.truncate.add("SmolLM2.Q8_0.gguf")
    path = resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))
    assert path.read_bytes() == model_path.read_bytes()
    gets = [p for m, p, _ in hub.requests if m == "GET" and p.endswith("Q8_0.gguf")]
    assert len(gets) == 2  # the cut one, then the resumed rest


def test_hub_that_cannot_be_reached_is_a_download_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying for 20 s
    with pytest.raises(ModelDownloadError, match="org/repo"):
        resolve_model(ModelSpec.parse("org/repo:Q4_K_M"))
    with pytest.raises(ModelDownloadError, match="not in the local cache"):
        resolve_model(ModelSpec.parse("org/repo:model.gguf"))


def test_an_unreachable_hub_is_one_clear_line_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "llm_magic", "serve", "--port", "0", "--model", "org/mistyped:Q4_K_M"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    # no retries (huggingface_hub retries a refused connection for about 25 s, warning twice each time)
    assert result.stderr.splitlines() == [
        f"error: cannot get org/mistyped:Q4_K_M: the hub cannot be reached ({env['HF_ENDPOINT']}: connection refused) "
        "and the model is not in the local cache; check the connection (or HF_ENDPOINT), then retry"]


def test_a_cached_model_is_served_when_the_hub_cannot_be_reached(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    from tests.conftest import free_port

    first = resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:Q4_1"))
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    assert resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:Q4_1")) == first
    assert resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q4_1.gguf")) == first
    with pytest.raises(ModelDownloadError, match=r"SmolLM2\.Q8_0\.gguf .* not in the local cache: the hub cannot be reached"):
        resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))


def test_a_mistyped_repo_on_a_reachable_hub_says_so(hub) -> None:
    with pytest.raises(ModelNotFound, match="no model repository 'test-org/SmolLM2-GUFF' on the hub: check the spelling"):
        resolve_model(ModelSpec.parse("test-org/SmolLM2-GUFF"))


def test_a_download_that_fills_the_disk_is_a_clear_error(hub, tmp_path: Path) -> None:
    import subprocess
    import sys

    # A real write failure part-way: the child may write files of at most 1 MiB (the 98 MB
    # model cannot fit), as on a full disk.
    code = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from llm_magic.models import ModelSpec, resolve_model
from llm_magic.errors import LLMMagicError
try:
    resolve_model(ModelSpec.parse("test-org/SmolLM2-GGUF:SmolLM2.Q8_0.gguf"))
except LLMMagicError as exc:
    print(type(exc).__name__, exc.message)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ModelDownloadError download of SmolLM2.Q8_0.gguf from test-org/SmolLM2-GGUF failed")
    assert "File too large" in out and "check the disk space" in out
