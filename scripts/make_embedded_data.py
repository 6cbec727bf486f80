"""Rebuild the data subsets shipped in ``muse_lightning/assets`` from the Debian packages.

    apt-get install dataset-fashion-mnist wordnet-base
    python scripts/make_embedded_data.py

Deterministic: the same packages give byte-identical files.
"""
import gzip
import io

import numpy as np

from muse_lightning.datasets import ASSETS, read_fashion_mnist, read_wordnet_glosses, split_indices

FASHION_TRAIN, FASHION_TEST, GLOSSES = 10_000, 2_000, 24_000


def main() -> None:
    data = read_fashion_mnist()
    arrays = {}
    for split, size in (("train", FASHION_TRAIN), ("test", FASHION_TEST)):
        images, labels = data[split]
        keep = split_indices(labels, [size / len(labels)], seed=0)[0]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep].astype(np.uint8)
    np.savez_compressed(ASSETS / "fashion_mnist_subset.npz", **arrays)

    texts, labels = read_wordnet_glosses()
    keep = split_indices(labels, [GLOSSES / len(labels)], seed=0)[0]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write("".join(f"{labels[i]}\t{texts[i]}\n" for i in keep).encode("utf-8"))
    (ASSETS / "wordnet_glosses_subset.tsv.gz").write_bytes(buf.getvalue())


if __name__ == "__main__":
    main()
