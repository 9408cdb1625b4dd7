"""``trimode convert [MODEL] OUT [--to gguf] [--outtype f32|f16|bf16|q8_0] [--arch dream|llama]``.

The paths come together (argparse cannot split them around options when MODEL is optional).
"""

from __future__ import annotations

import argparse


def add_convert_parser(sub, parser_class) -> None:
    p = sub.add_parser("convert", help="write a checkpoint as GGUF (llama.cpp's format)",
                       description="Write a checkpoint as GGUF through the gguf package, with the "
                       "tokenizer and chat template inside. --arch dream: NLD as the community "
                       "converter writes it (non-causal, mask token, diffusion.shift_logits=false); "
                       "--arch llama: the autoregressive view for llama.cpp's ordinary tools.")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, .gguf file or cached hub id (default: the embedded model)")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--to", choices=["gguf"], default="gguf", help="output format (default: gguf)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="type of the weight matrices; norms stay f32 (default: f32)")
    p.add_argument("--arch", choices=["dream", "llama"], default="dream",
                   help="GGUF architecture (default: dream)")


def run_convert(args: argparse.Namespace) -> int:
    from ...checkpoint.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, args.outtype, arch=args.arch)
    print(out)
    return 0
