"""Where a model goes on a machine with several GPUs: one GPU, or split over all of them.

llama.cpp's default splits every model's layers over every GPU it sees. A second GPU then
costs speed for a model that fits on one (issue #24: "a second visible GPU can slow llama.cpp
badly"): every token's activations cross from one GPU to the other, over PCIe without
peer-to-peer on most cloud machines, and each GPU waits for the other's layers. So unless the owner says otherwise (``--split-mode``,
``--tensor-split``, ``--main-gpu``), a model that fits on the GPU with the most free memory
goes on that one alone, and only a model that fits on none is split, by free memory.

Pure functions of what they are given (no nvidia-smi, no llama_cpp), so that each choice can
be tested without a GPU. GPU numbers here are llama.cpp's (``CUDA0``, ``CUDA1``, …): the
position in the list of GPUs it sees (``gpu.visible``, which reads ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from llm_magic.engine.llama_cpp.gpu import Gpu
from llm_magic.errors import InvalidRequest

SPLIT_MODES = ("none", "layer", "row")  # llama.cpp's LLAMA_SPLIT_MODE_NONE / _LAYER / _ROW
GIB = 2**30
MIB = 2**20
# What llama.cpp needs on a GPU besides the weights, the KV cache and the logits of a ubatch, in
# ``estimate``: the CUDA context and cuBLAS workspace (about 0.3-0.5 GiB before llama.cpp allocates
# anything) and the rest of the compute buffers (activations of one ubatch: tens of MiB for a 7B
# model at ubatch 512, a few hundred without flash attention at long contexts), rounded up.
GPU_OVERHEAD = 1 * GIB


@dataclass(frozen=True)
class SplitFlags:
    """What the host's owner asked for; None: the host chooses."""

    split_mode: str | None = None
    main_gpu: int | None = None
    tensor_split: tuple[float, ...] | None = None

    @property
    def given(self) -> bool:
        return self.split_mode is not None or self.main_gpu is not None or self.tensor_split is not None


@dataclass(frozen=True)
class Placement:
    """What llama.cpp's model params get. ``split_mode`` None: llama.cpp's own defaults (split
    by layer over every GPU it sees, main GPU 0) and nothing is set."""

    split_mode: str | None
    main_gpu: int | None = None
    tensor_split: tuple[float, ...] | None = None
    reason: str = ""
    devices: tuple[int, ...] = ()  # the GPUs it uses, llama.cpp's numbers (for the device name); () unknown


DEFAULT = Placement(None)  # 0 or 1 GPU: nothing to choose, nothing to say


def kv_bytes_per_cell(metadata: dict[str, str]) -> int | None:
    """Bytes of llama.cpp's f16 KV cache per cell (one token of one slot), from the GGUF's
    metadata: layers x KV heads x (key + value width) x 2 bytes. None when the metadata does not
    say (then nothing can be estimated). A value that is a list per layer (some models give each
    layer its own head count) counts as the widest; a missing KV head count as every head."""
    arch = metadata.get("general.architecture", "")

    def number(name: str) -> int | None:
        found = [int(x) for x in re.findall(r"\d+", metadata.get(f"{arch}.{name}", ""))]
        return max(found) if found else None

    layers, width, heads = number("block_count"), number("embedding_length"), number("attention.head_count")
    if layers is None or width is None:
        return None
    kv_heads = number("attention.head_count_kv") or heads or 1
    head = width // max(heads or 1, 1)
    widths = (number("attention.key_length") or head) + (number("attention.value_length") or head)
    return layers * kv_heads * widths * 2


def estimate(weights: int, kv_bytes: int, n_vocab: int, ubatch: int) -> int:
    """Bytes a model needs on GPUs: its weights (the GGUF files' size: llama.cpp copies the
    tensors as they are), its KV cache (every slot's: ``kv_bytes_per_cell`` x ``--ctx`` x
    ``--parallel``), the logits of one ubatch (``ubatch`` x ``n_vocab`` floats, the largest
    compute buffer: 0.3 GiB for Qwen's 152k tokens at 512) and ``GPU_OVERHEAD`` for the rest.
    On the safe side for most models (a sliding-window cache is counted whole); a model that only
    just fits may still run out of memory."""
    return weights + kv_bytes + ubatch * n_vocab * 4 + GPU_OVERHEAD


def check(flags: SplitFlags, gpus: Sequence[Gpu] | None, max_devices: int | None) -> None:
    """A clear error for split settings llama.cpp would refuse or silently ignore. ``gpus``:
    what llama.cpp sees (``visible``), checked against only when known and not empty (a machine
    without nvidia-smi may still have a GPU); ``max_devices``: llama.cpp's ``LLAMA_MAX_DEVICES``."""
    if flags.split_mode is not None and flags.split_mode not in SPLIT_MODES:
        raise InvalidRequest(f"'--split-mode' must be one of {', '.join(SPLIT_MODES)}, not {flags.split_mode!r}")
    if flags.main_gpu is not None and flags.main_gpu < 0:
        raise InvalidRequest(f"'--main-gpu' must be 0 or more, not {flags.main_gpu}")
    if flags.tensor_split is not None:
        if any(not x >= 0 or x == float("inf") for x in flags.tensor_split) or not any(flags.tensor_split):
            raise InvalidRequest("'--tensor-split' takes proportions per GPU, such as 3,1: numbers of 0 or more, "
                                 "at least one above 0")
        if flags.split_mode == "none":
            raise InvalidRequest("'--tensor-split' splits the model over GPUs, but '--split-mode none' keeps it on "
                                 "one: leave one of them out")
        if max_devices is not None and len(flags.tensor_split) > max_devices:
            raise InvalidRequest(f"'--tensor-split' has {len(flags.tensor_split)} entries, but llama.cpp takes at "
                                 f"most {max_devices} GPUs")
    if not gpus:
        return
    names = f"{len(gpus)} GPU{'s' * (len(gpus) > 1)} (" + ", ".join(f"CUDA{i}" for i in range(len(gpus))) + ")"
    if flags.main_gpu is not None and flags.main_gpu >= len(gpus):
        raise InvalidRequest(f"'--main-gpu' is {flags.main_gpu}, but llama.cpp sees {names}; "
                             "`llm-magic gpu` lists them")
    if flags.tensor_split is not None and len(flags.tensor_split) > len(gpus):
        raise InvalidRequest(f"'--tensor-split' has {len(flags.tensor_split)} entries, but llama.cpp sees {names}; "
                             "give one proportion per GPU")


def _free_mib(gpu: Gpu) -> int | None:
    if gpu.memory_total_mib is None or gpu.memory_used_mib is None:
        return None
    return max(0, gpu.memory_total_mib - gpu.memory_used_mib)


def _gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


def _ratio(split: Sequence[float]) -> str:
    return ",".join(f"{x:g}" for x in split)


def choose(flags: SplitFlags, gpus: Sequence[Gpu] | None, need: Callable[[], int | None]) -> Placement:
    """Where the model goes. ``gpus``: those llama.cpp sees, in its order (None: unknown);
    ``need``: the bytes the model needs on GPUs (``estimate``; None: unknown), asked only when
    the choice depends on it. What the flags say is kept; the host fills in only what they leave
    open."""
    free = [_free_mib(g) for g in gpus or ()]
    known = bool(free) and None not in free
    freest = max(range(len(free)), key=lambda i: free[i] or 0) if known else None
    if flags.given:
        return _as_asked(flags, gpus, free if known else None, freest)
    if gpus is None:
        return Placement(None, reason="llama.cpp's defaults: which GPU is which is unknown (CUDA_VISIBLE_DEVICES "
                                      "names GPUs nvidia-smi's indices do not match, or CUDA_DEVICE_ORDER is not "
                                      "PCI_BUS_ID)")
    if len(gpus) < 2:
        return DEFAULT
    if not known or freest is None:
        return Placement(None, reason="llama.cpp's defaults: nvidia-smi did not report every GPU's memory")
    needed = need()
    best = free[freest] or 0
    split = tuple(float(f or 0) for f in free)
    spread = f"layers split over {len(gpus)} GPUs by free memory ({' + '.join(_gib(f or 0) for f in free)})"
    if needed is None:  # llama.cpp's own default, which loads whatever the size
        return Placement("layer", None, split, devices=tuple(range(len(gpus))),
                         reason=f"{spread}: the model's size could not be estimated from its metadata")
    needed_mib = needed / MIB
    if needed_mib <= best:
        return Placement("none", freest, None, devices=(freest,), reason=(
            f"on CUDA{freest} alone (split mode none): the model needs about {_gib(needed_mib)} with its KV cache "
            f"and buffers, and CUDA{freest} has {_gib(best)} free; a second GPU would only slow it down"))
    short = "" if needed_mib <= sum(split) else (
        f"; that is more than all {len(gpus)} GPUs have free together: it may not load (lower --ctx, --parallel "
        "or --gpu-layers)")
    return Placement("layer", None, split, devices=tuple(range(len(gpus))), reason=(
        f"{spread}: the model needs about {_gib(needed_mib)} with its KV cache and buffers, more than the freest "
        f"GPU has ({_gib(best)})" + short))


def _as_asked(flags: SplitFlags, gpus: Sequence[Gpu] | None, free: list[int | None] | None,
              freest: int | None) -> Placement:
    """The owner's flags, with what they leave open filled in: a split mode from the others
    (``--tensor-split``: layer; ``--main-gpu`` alone: none, on that GPU), the freest GPU as the
    main one, proportions by free memory for a split. The reason says which is which."""
    if flags.split_mode is not None:
        mode, said = flags.split_mode, [f"split mode {flags.split_mode} (as asked)"]
    elif flags.tensor_split is not None:
        mode, said = "layer", ["split mode layer (for --tensor-split)"]
    else:
        mode, said = "none", ["split mode none (for --main-gpu)"]
    main = flags.main_gpu
    if main is not None:
        said.append(f"main GPU {main} (as asked)")
    elif mode != "layer" and freest is not None:  # layer mode has no use for a main GPU
        main = freest
        said.append(f"main GPU {main} (the most memory free)")
    split = flags.tensor_split
    if split is not None:
        said.append(f"tensor split {_ratio(split)} (as asked)")
    elif mode != "none" and free is not None and len(free) > 1:
        split = tuple(float(f or 0) for f in free)
        said.append(f"tensor split {_ratio(split)} (MiB free)")
    count = len(gpus) if gpus else 0
    devices = ((main or 0,) if mode == "none" else tuple(range(count))) if count else ()
    return Placement(mode, main, split, reason=", ".join(said), devices=devices)


def unused_on_cpu(flags: SplitFlags) -> Placement:
    """The model runs on the CPU: nothing to place, and llama.cpp's defaults kept (split mode
    none with a main GPU is an error to llama.cpp where it has no GPU)."""
    if not flags.given:
        return DEFAULT
    return Placement(None, reason="on the CPU: --split-mode, --tensor-split and --main-gpu change nothing")
