"""gallery.html: the top pool/evaluation matches side by side, and the pairs just under the threshold.

One self-contained HTML file (thumbnails inlined as base64 JPEG) so a person can open it anywhere and
judge by eye whether the threshold separates copies from look-alikes.
"""

from __future__ import annotations

import html
import logging
import tarfile
from typing import Any

from laiontools.core.storage import atomic_write_bytes, url_to_fs
from laiontools.gallery import THUMB, pool_images, thumbnail_b64

log = logging.getLogger(__name__)


def eval_images(es: Any, wanted: set[str]) -> dict[str, Any]:
    """item id -> PIL image for the wanted items of an evaluation set (direct read for folder formats)."""
    from laiontools.evalsets import decode_image, iter_items

    out: dict[str, Any] = {}
    if not wanted:
        return out
    if es.format in ("imagefolder", "folder"):
        fs, root = url_to_fs(es.path)
        for item_id in wanted:
            try:
                with fs.open(root.rstrip("/") + "/" + item_id, "rb") as f:
                    out[item_id] = decode_image(f.read())
            except Exception as e:  # noqa: BLE001 - left out of the gallery, said in the log
                log.warning("gallery: evaluation item %s/%s unreadable: %s", es.name, item_id, e)
        return out
    for item in iter_items(es):
        if item.item_id in wanted and item.image is not None:
            out[item.item_id] = item.image
            if len(out) == len(wanted):
                break
    return out


def _img_tag(image: Any) -> str:
    return f'<img src="{thumbnail_b64(image)}">' if image is not None else '<div class="missing">image unavailable</div>'


def write_gallery(
    path: str, pool: Any, sets: list[Any], threshold: float, model_desc: str,
    above: list[tuple[float, str, dict[str, Any]]], below: list[tuple[float, str, dict[str, Any]]],
) -> None:
    """Write the gallery for the given pairs (each `(similarity, uid, pair)` as the search returned them)."""
    pairs = [p for _, _, p in above] + [p for _, _, p in below]
    by_tar: dict[str, set[str]] = {}
    for p in pairs:
        tar = pool.tar_by_shard.get(p["shard"])
        if tar and p.get("key"):
            by_tar.setdefault(tar, set()).add(p["key"])
    pool_imgs: dict[tuple[str, str], tuple[Any, str | None]] = {}
    for tar, keys in by_tar.items():
        try:
            for k, v in pool_images(tar, keys).items():
                pool_imgs[(tar, k)] = v
        except (OSError, tarfile.TarError) as e:
            log.warning("gallery: cannot read pool tar %s: %s", tar, e)
    by_set = {es.name: es for es in sets}
    wanted: dict[str, set[str]] = {}
    for p in pairs:
        wanted.setdefault(p["evalset"], set()).add(p["item_id"])
    eval_imgs = {(name, i): im for name, ids in wanted.items() for i, im in eval_images(by_set[name], ids).items()}

    def rows(section: list[tuple[float, str, dict[str, Any]]]) -> str:
        if not section:
            return "<p>(none)</p>"
        out = ['<table><tr><th>pool image</th><th>evaluation image</th><th>similarity</th><th>pool caption / ids</th></tr>']
        for sim, uid, p in section:
            tar = pool.tar_by_shard.get(p["shard"])
            pim, cap = pool_imgs.get((tar, p.get("key")), (None, None)) if tar else (None, None)
            eim = eval_imgs.get((p["evalset"], p["item_id"]))
            out.append(
                f"<tr><td>{_img_tag(pim)}</td><td>{_img_tag(eim)}</td><td class=sim>{sim:.4f}</td>"
                f"<td><div>{html.escape(cap or '')}</div><div class=ids>uid {html.escape(uid)}<br>shard {html.escape(str(p['shard']))} "
                f"key {html.escape(str(p.get('key')))}<br>{html.escape(p['evalset'])}: {html.escape(p['item_id'])}</div></td></tr>"
            )
        out.append("</table>")
        return "\n".join(out)

    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>laiontools dedup gallery</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}}
img{{max-width:{THUMB}px;max-height:{THUMB}px}} .sim{{font-size:1.3em;font-weight:bold}} .ids{{color:#666;font-size:.8em}}
.missing{{width:{THUMB}px;height:60px;background:#eee;color:#999;text-align:center}}</style></head><body>
<h1>dedup gallery</h1>
<p>model {html.escape(model_desc)}; threshold {threshold} (cosine similarity; a pool sample at or above it is a duplicate).
Check that the first table shows copies and the second look-alikes; if not, run <code>laiontools dedup calibrate</code>
and re-run with another <code>--threshold</code>.</p>
<h2>Top matches (similarity &ge; {threshold}): {len(above)} shown</h2>
{rows(above)}
<h2>Just under the threshold (similarity &lt; {threshold}): {len(below)} shown</h2>
{rows(below)}
</body></html>
"""
    atomic_write_bytes(path, doc.encode("utf-8"))
