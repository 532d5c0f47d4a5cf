"""``pyqvm image build|list|prune|export|import``: the built-in guest images."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyqvm.image.artifact import Exported


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    p = sub.add_parser("image", help="the built-in guest image")
    isub = p.add_subparsers(dest="image_command", required=True)
    build = isub.add_parser(
        "build", parents=list(parents), help="build the built-in guest from Debian packages"
    )
    build.add_argument("--flavour", choices=["default", "full", "debian", "all"], default="default")
    build.add_argument(
        "--arch", choices=["x86_64", "aarch64"], default="x86_64", help="guest architecture"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    isub.add_parser("list", parents=list(parents), help="list the built images, newest first")
    prune = isub.add_parser(
        "prune",
        parents=list(parents),
        help="remove every built image but the newest of each flavour and arch",
        description="Remove every built image but the newest of each flavour. A state saved "
        "(VM.save) from a VM on an older image needs that image to be restored.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    export = isub.add_parser(
        "export",
        parents=list(parents),
        help="write a built image as one file (for a CI cache or another machine)",
        description="Write the newest built image of flavour NAME (or the image in directory "
        "NAME) as one compressed file with every file's SHA-256; prints the file and its "
        "digest, which `pyqvm image import --digest` pins.",
    )
    export.add_argument("image", metavar="NAME|DIR", help="a flavour, or an image directory")
    export.add_argument("-o", "--output", required=True, help="the file to write")
    export.add_argument(
        "--arch", choices=["x86_64", "aarch64"], default="x86_64", help="with a flavour"
    )
    imp = isub.add_parser(
        "import",
        parents=list(parents),
        help="check an exported image and install it into the cache",
        description="Check every file of an export against its index (and the whole export "
        "against --digest) and install the image into the cache; a truncated, corrupt or "
        "edited file is refused and nothing is left behind.",
    )
    imp.add_argument("file", help="a file `pyqvm image export` wrote")
    imp.add_argument("--digest", help="sha256:<hex> as the export printed it: accept only that")
    # A long build shows its progress.
    p.set_defaults(run=run, min_log_level="info")


def run(args: argparse.Namespace) -> int:
    from pyqvm import image

    if args.image_command == "build":
        from pyqvm import imagebuild

        for f in image.FLAVOURS if args.flavour == "all" else (args.flavour,):
            img = imagebuild.build(f, force=args.force, arch=args.arch)
            print(
                f"{img.flavour}{'' if img.arch == 'x86_64' else f' ({img.arch})'}: {img.directory}"
            )
    elif args.image_command == "list":
        newest: set[tuple[str, str]] = set()
        for img in image.built_images():
            size = sum(p.stat().st_size for p in img.directory.iterdir()) >> 20
            kind = (img.flavour, img.arch)
            mark = "" if kind in newest else "  (newest: the one VMs use)"
            newest.add(kind)
            print(
                f"{img.flavour:8} {img.arch:8} {img.kernel_version:24} {size:5d} MiB  "
                f"{img.directory}{mark}"
            )
    elif args.image_command == "export":
        exported = _export(args)
        print(f"{exported.path} {exported.digest}")
    elif args.image_command == "import":
        from pyqvm.image.artifact import import_image

        img = import_image(Path(args.file), digest=args.digest)
        print(f"{img.flavour}{'' if img.arch == 'x86_64' else f' ({img.arch})'}: {img.directory}")
    else:
        for img in image.prune(dry_run=args.dry_run):
            print(f"{'would remove' if args.dry_run else 'removed'} {img.directory}")
    return 0


def _export(args: argparse.Namespace) -> Exported:
    from pyqvm import image
    from pyqvm.errors import SpecError
    from pyqvm.image.artifact import export_image
    from pyqvm.image.guest import load_image

    if args.image in image.FLAVOURS:
        img = image.find(args.image, arch=args.arch)
    elif (found := load_image(Path(args.image))) is not None:
        img = found
    else:
        raise SpecError(
            "image", f"{args.image!r} is neither a flavour {image.FLAVOURS} nor an image directory"
        )
    return export_image(img, Path(args.output))
