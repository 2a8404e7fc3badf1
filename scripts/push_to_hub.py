#!/usr/bin/env python
"""Upload a directory written by this project's scripts to the Hugging Face Hub, in one commit.

    python scripts/push_to_hub.py DIR --repo_id user/name [--private] [--revision BRANCH] [--commit_message MSG]

Creates the model repo if needed (and the branch for `--revision`), then commits every file of DIR (weights,
config, modeling files, README.md model card, image processor config, ...). The directory is only read: when the
upload fails (offline, no token, no network, refused) the error says what to do and DIR is unchanged.
Uses `modeling_ijepa.hub.push_folder_to_hub`; token from `hf auth login` or HF_TOKEN, endpoint from HF_ENDPOINT.
"""

from __future__ import annotations

import argparse
import sys

from modeling_ijepa.hub import HubUploadError, push_folder_to_hub


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="directory to upload (e.g. the --output_dir of a script)")
    parser.add_argument("--repo_id", required=True, help="Hub model repo, 'user_or_org/name'")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit_message", default=None, help="default: 'Upload <folder> (<n> files)'")
    args = parser.parse_args(argv)
    try:
        info = push_folder_to_hub(
            args.folder, args.repo_id, private=args.private or None, revision=args.revision,
            commit_message=args.commit_message,
        )
    except HubUploadError as error:
        # The message already says what to do; no traceback for these expected situations.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(f"uploaded {args.folder} to {args.repo_id}: {info.commit_url}")
    return info.commit_url


if __name__ == "__main__":
    main()
