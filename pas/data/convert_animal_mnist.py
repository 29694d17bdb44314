"""One-time conversion of the published animal-mnist 0.4 wheel into ``animal_mnist.npz``.

Not imported by ``pas`` at run time: this is the only place in the repository where a
pickle is read, and it only ever reads the two files of the published wheel, after
checking them against the sha256 digests recorded in that wheel's RECORD.

Usage (run once, from the repository root)::

    pip download --no-deps animal_mnist==0.4 -d /tmp/am     # animal_mnist-0.4-py3-none-any.whl
    python pas/data/convert_animal_mnist.py /tmp/am/animal_mnist-0.4-py3-none-any.whl

The argument may be the ``.whl`` file itself or a folder it was unzipped into.  It writes
``pas/data/animal_mnist.npz`` (arrays ``images`` uint8 (10000, 28, 28) and ``labels`` uint8
(10000,), label order Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra)
and ``pas/data/animal_mnist.sha256``.  The npz is written with fixed zip timestamps so the
same wheel gives the same bytes (given the same zlib).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBERS = {
    # path inside the wheel -> urlsafe-b64 sha256 from the wheel's RECORD
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz": "aKMDRngaCYT4OUY6RhXS3suJnRzmUJG7klhjEXVKNM4",
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz": "3sjbp8RpgwmJ-6tGglAhoIo4RwdTpRLyetqEfs7Ze1c",
}
HERE = Path(__file__).resolve().parent


def _read_member(source: Path, member: str) -> bytes:
    if source.is_dir():
        return (source / member).read_bytes()
    with zipfile.ZipFile(source) as zf:
        return zf.read(member)


def _load_verified(source: Path, member: str):
    raw = _read_member(source, member)
    digest = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
    if digest != MEMBERS[member]:
        raise SystemExit(f"{member}: sha256 {digest} does not match the animal-mnist 0.4 RECORD ({MEMBERS[member]})")
    return pickle.loads(gzip.decompress(raw))  # trusted: digest-pinned file of the published wheel


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed timestamps so the output is reproducible."""
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    source = Path(argv[0])
    data_member, label_member = MEMBERS
    images = np.asarray(_load_verified(source, data_member))
    labels = np.asarray(_load_verified(source, label_member))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8, (images.shape, images.dtype)
    assert labels.shape == (10000,) and labels.min() == 0 and labels.max() == 9, labels.shape
    assert np.bincount(labels).tolist() == [1000] * 10
    npz = HERE / "animal_mnist.npz"
    _write_npz(npz, {"images": images, "labels": labels.astype(np.uint8)})
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    (HERE / "animal_mnist.sha256").write_text(f"{digest}  animal_mnist.npz\n")
    print(f"wrote {npz} ({npz.stat().st_size} bytes), sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
