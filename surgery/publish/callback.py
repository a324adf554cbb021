"""`PublishRun`: a recipe's `publish:` section, publishing the run to the Hub when fit ends.

    publish:
      repo_id: my-user/tiny-gpt2-ln-free   # unset (the default): nothing is published
      private: false
      dry_run: null                        # a directory: write the folder there, upload nothing

It runs in `teardown("fit")`, which Lightning calls only after a fit that ended normally, once every
`on_fit_end` (the callbacks', so `ExportRun`'s model/ and metrics.json, then the module's) has run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from surgery.errors import SurgeryError


class PublishRun(L.Callback):
    """Publish `<trainer.default_root_dir>` with `surgery.publish.publish` at the end of a finished fit.

    Args:
        repo_id: OWNER/NAME on the Hub; None (the default) turns publishing off.
        private: create the repository private.
        revision: branch to commit to (created if missing); None: main.
        dry_run: write the folder to this directory instead of uploading (relative paths: under the run directory).
        license: Hub license id of the card.
    """

    def __init__(self, repo_id: str | None = None, private: bool = False, revision: str | None = None,
                 dry_run: str | None = None, license: str = "mit"):
        self.repo_id, self.private, self.revision, self.dry_run, self.license = repo_id, private, revision, dry_run, license
        self._fit_ended = False
        self.result: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.repo_id and stage == "fit":
            from surgery.publish.hub import check_repo_id, resolve_token

            check_repo_id(self.repo_id)  # fail before training, not after it
            if self.dry_run is None:
                resolve_token()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_ended = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.repo_id or not self._fit_ended or not trainer.is_global_zero:
            return
        from surgery.publish import publish

        run_dir = Path(trainer.default_root_dir)
        dry_run = None if self.dry_run is None else run_dir / self.dry_run
        try:
            self.result = publish(run_dir, self.repo_id, private=self.private, revision=self.revision,
                                  dry_run=dry_run, license=self.license)
        except SurgeryError as err:
            raise SurgeryError(f"{err}\nThe run itself finished in {run_dir}; publish it later with "
                               f"`surgery publish {run_dir} --repo-id {self.repo_id}`") from err
        where = f"wrote {dry_run} (dry run, nothing uploaded)" if dry_run else f"published {self.result['commit_url']}"
        print(f"publish: {where}")
