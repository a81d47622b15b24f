#!/usr/bin/env python3
"""Validate ONNX files with the reference checker: onnx.checker.check_model(full_check=True).

Usage: scripts/check_onnx.py FILE.onnx [FILE.onnx ...]
Needs PyPI `onnx` (verified with onnx 1.23.2). External data (<model>.onnx.data) is resolved
from the model's folder: the checker is given the path, so models over 2 GiB work too.
Exit status 0 when every file passes, 1 otherwise (each failure names its file).
"""
import sys

try:
    import onnx
except ImportError:
    sys.stderr.write("check_onnx.py: the `onnx` package is missing (pip install onnx)\n")
    sys.exit(2)


def main(paths):
    if not paths:
        sys.stderr.write(__doc__)
        return 2
    failed = 0
    for p in paths:
        try:
            # Path form: the checker loads external data itself and handles > 2 GiB models.
            onnx.checker.check_model(p, full_check=True)
            m = onnx.load(p, load_external_data=False)
            ops = sorted({n.op_type for n in m.graph.node})
            print(f"OK {p}: opset {m.opset_import[0].version}, IR {m.ir_version}, "
                  f"{len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers, ops {' '.join(ops)}")
        except Exception as e:  # noqa: BLE001 - report every file
            failed += 1
            print(f"FAIL {p}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
