"""`python -m cxr COMMAND ...`: the project's user-facing commands (the pipeline itself runs through `dvc repro`).

A command is a module with `add_arguments(parser)` and `run(args) -> exit status`; add more to COMMANDS.
"""
import argparse
import importlib
import sys

from . import quiet

COMMANDS = {
    # name: (module, one-line help)
    "predict": ("cxr.predict", "classify chest X-ray image files with a trained model -> CSV"),
    "check": ("cxr.needs", "check what a pipeline run needs from outside the project (dataset, ImageNet weights)"),
    "plots": ("cxr.plots", "the plots (dvc plots show / diff) as one self-contained HTML page that works offline"),
}


def main(argv=None) -> int:
    quiet.tensorflow()  # before a command loads TensorFlow (commands import it only when they run a model)
    parser = argparse.ArgumentParser(prog="python -m cxr", description="COVID-19 chest X-ray triage: user commands.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=getattr(module, "DESCRIPTION", help_text),
                           epilog=getattr(module, "EPILOG", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
