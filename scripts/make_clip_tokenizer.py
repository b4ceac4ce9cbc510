"""Build the CLIP BPE tokenizer files shipped in `instruct_core/configs/clip_tokenizer/`.

Nothing can be downloaded when the package runs, so `vocab.json` and `merges.txt` are built once from the
BPE table OpenAI published with CLIP (`bpe_simple_vocab_16e6.txt.gz`, also shipped inside the
open-clip-torch wheel) exactly as CLIP's `SimpleTokenizer` builds its encoder:

    byte-unicode symbols, then the same symbols + "</w>", then every merge joined,
    then "<|startoftext|>", "<|endoftext|>"                     -> 49408 ids

`merges.txt` keeps the `#version: 0.2` header line that the Hugging Face BPE reader skips.

Usage:
    python scripts/make_clip_tokenizer.py                 # pip-downloads open-clip-torch==3.3.0 to a temp dir
    python scripts/make_clip_tokenizer.py --bpe FILE.gz   # use a local copy of the BPE table
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "instruct_core" / "configs" / "clip_tokenizer"

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "model_max_length": 77,
}
SPECIAL_TOKENS_MAP = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters (same order as CLIP's code)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def fetch_bpe(workdir: Path) -> Path:
    """pip-download the open-clip-torch wheel (no dependencies) and extract the BPE table from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", OPEN_CLIP_REQUIREMENT, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("open_clip_torch-*.whl"))
    target = workdir / "bpe_simple_vocab_16e6.txt.gz"
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(BPE_MEMBER))
    return target


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    digest = hashlib.sha256(bpe_gz.read_bytes()).hexdigest()
    if digest != BPE_SHA256:
        raise SystemExit(f"{bpe_gz}: sha256 {digest} is not the published CLIP BPE table ({BPE_SHA256})")
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    # line 0 is a header; CLIP uses the next 48894 merges and ignores the rest
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in the CLIP vocabulary")
    return vocab


def write_tokenizer(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe", type=Path, help="local bpe_simple_vocab_16e6.txt.gz (skips the pip download)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bpe = args.bpe or fetch_bpe(Path(tmp))
        merges = read_merges(bpe)
    vocab = build_vocab(merges)
    write_tokenizer(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
