"""The upload phase, between planning and rendering: the workspace's code and configuration
packaged and stored under the plan's storage root, for the steps to run instead of the image's."""

from __future__ import annotations

from kvx_runtime.compiler.plan import PipelinePlan
from kvx_runtime.log import get_logger

__all__ = ["upload_code"]

log = get_logger(__name__)


def upload_code(plan: PipelinePlan) -> PipelinePlan:
    """The plan whose exec-node steps fetch the uploaded archive (``plan`` itself when it asks
    for no upload)."""
    source = plan.code_upload
    if source is None:
        return plan
    from kvx_runtime.code_upload import build_archive, upload_archive

    archive = build_archive(source.project_path, source.package_name, source.conf_root)
    reference = upload_archive(archive, plan.storage_root)
    log.info("code archive", sha256=archive.digest, files=len(archive.files), bytes=len(archive.data))
    return plan.with_code(reference)
