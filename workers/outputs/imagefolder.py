"""The image folder: every kept image as a loose file, `dataset/imagefolder/{identity:06d}/{sample:03d}.{ext}`
(`app.layout.IMAGEFOLDER`), when the spec lists `imagefolder`. The index names each image's path
here (null for a job without loose images)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.outputs import PackageContext, ShardContext

CONTENT_TYPE = {"jpeg": "image/jpeg", "png": "image/png"}  # by spec.output.image_format


class ImageFolder:
    name = "imagefolder"
    always = False

    def write_shard(self, ctx: ShardContext) -> None:
        """Store each kept image and record its path."""
        fmt = ctx.spec.output.image_format
        for record in ctx.records:
            i, s = record["identity"], record["sample"]
            key = ctx.keys.image(i, s, ctx.ext)
            ctx.storage.put_bytes(key, ctx.data[(i, s)], CONTENT_TYPE[fmt])
            ctx.locate(i, s, path=ctx.keys.relative(key))

    def package(self, ctx: PackageContext) -> None:
        """Nothing: the shards wrote the images."""
