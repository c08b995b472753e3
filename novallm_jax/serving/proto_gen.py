"""Regenerates the committed gRPC stubs from novallm.proto (run from the repository root after editing the .proto).

    python -m novallm_jax.serving.proto_gen            # rewrites novallm_pb2.py and novallm_pb2_grpc.py in place

The stubs are committed so that installing the package needs no grpc_tools; a test checks they are up to date.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

PROTO = "novallm_jax/serving/novallm.proto"
OUTPUTS = ("novallm_jax/serving/novallm_pb2.py", "novallm_jax/serving/novallm_pb2_grpc.py")
HEADER = (
    "# Generated from novallm.proto by `python -m novallm_jax.serving.proto_gen` (grpc_tools.protoc),\n"
    "# committed so that installs need no grpc_tools. DO NOT EDIT: edit the .proto and regenerate.\n"
)


def generate(root: str, out_dir: str) -> dict[str, str]:
    """Runs protoc on `root`/novallm.proto into `out_dir`; returns {repo-relative path: text with the header}."""
    from grpc_tools import protoc

    # Generate in a scratch copy so that the import paths inside the stubs are package paths.
    with tempfile.TemporaryDirectory() as scratch:
        os.makedirs(os.path.join(scratch, os.path.dirname(PROTO)))
        shutil.copy(os.path.join(root, PROTO), os.path.join(scratch, PROTO))
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{scratch}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                os.path.join(scratch, PROTO),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with status {rc}")
        texts = {}
        for rel in OUTPUTS:
            with open(os.path.join(scratch, rel)) as f:
                texts[rel] = HEADER + f.read()
    for rel, text in texts.items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return texts


if __name__ == "__main__":
    here = os.getcwd() if len(sys.argv) < 2 else sys.argv[1]
    generate(here, here)
