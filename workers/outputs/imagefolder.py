"""The image folder: every kept image as a loose file, `dataset/imagefolder/{identity:06d}/{sample:03d}.{ext}`
(`app.layout.IMAGEFOLDER`; the directory is the identity's label, `output.label_offset` + identity),
when the spec lists `imagefolder`. The index names each image's path here (null for a job without
loose images)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.storage import put_many

if TYPE_CHECKING:
    from workers.outputs import PackageContext, ShardContext

CONTENT_TYPE = {"jpeg": "image/jpeg", "png": "image/png"}  # by spec.output.image_format


class ImageFolder:
    name = "imagefolder"
    always = False

    def write_shard(self, ctx: ShardContext) -> None:
        """Store each kept image and record its path."""
        ctype = CONTENT_TYPE[ctx.spec.output.image_format]
        offset = ctx.spec.output.label_offset
        puts = []
        for record in ctx.records:
            i, s = record["identity"], record["sample"]
            key = ctx.keys.image(offset + i, s, ctx.ext)
            puts.append((key, ctx.data[(i, s)], ctype))
            ctx.locate(i, s, path=ctx.keys.relative(key))
        put_many(ctx.storage, puts)

    def package(self, ctx: PackageContext) -> None:
        """Nothing: the shards wrote the images."""
