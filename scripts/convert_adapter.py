"""Convert a NOLA adapter between nola's directory format and PEFT's, bit for bit (the direction is read off
the input): nola's adapter from training becomes one `PeftModel.from_pretrained` loads with NOLA's own layers (after
`import nola.peft`), and a PEFT NOLA adapter (from `save_pretrained` or TRL) becomes one nola's scripts read.

    python scripts/convert_adapter.py --adapter runs/tiny/adapter --out peft-adapter [--base-name NAME]
    python scripts/convert_adapter.py --adapter peft-adapter --out nola-adapter [--overwrite]

Only names change (tensor keys, config layout); values, seeds, the generator version and the base's fingerprint
carry over as they are, so converting there and back reproduces the input. Unlike merge_and_export.py
--format peft-lora, the PEFT form stays NOLA: kilobytes, trainable further, but served only where nola is
installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nola.cli import run_command
from nola.errors import NolaError


def convert(args: argparse.Namespace) -> None:
    from nola.adapter_io import read_adapter
    from nola.peft.convert import is_peft_nola_directory, nola_to_peft, peft_to_nola

    source, out = Path(args.adapter), Path(args.out)
    if not source.is_dir():
        raise NolaError(f"--adapter: {source} is not a directory")
    inside = {out.resolve(), *out.resolve().parents}, {source.resolve(), *source.resolve().parents}
    if source.resolve() in inside[0] or out.resolve() in inside[1]:  # one holds (or is) the other
        raise NolaError(f"--out: {out} overlaps --adapter {source}; write the conversion elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise NolaError(f"--out: {out} is not an empty directory (pass --overwrite to replace it)")
    if is_peft_nola_directory(source):
        peft_to_nola(source, out)
        print(f"nola adapter: {out} (from the PEFT NOLA adapter {source})")
    else:
        nola_to_peft(read_adapter(source), out, args.base_name)
        print(f"PEFT NOLA adapter: {out} (load it with `import nola.peft` and PeftModel.from_pretrained)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a nola adapter directory or a PEFT NOLA one")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--base-name", help="PEFT direction: base_model_name_or_path to record (a hub name or path)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    return run_command(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
