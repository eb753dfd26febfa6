"""The overview's chart as server-rendered SVG: bars of volume, a line of success rate. No script,
no CDN, no build step; it scales with the page (``viewBox``) and reads on a phone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    count: int
    succeeded: int
    settled: int

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.settled if self.settled else None


def fill(
    series: list[tuple[datetime, int, int, int]], start: datetime, step: timedelta, n: int
) -> list[Bucket]:
    """Every bucket of the window, empty ones included, from the database's sparse rows."""
    by_start = {row[0]: row for row in series}
    buckets = []
    for i in range(n):
        at = start + step * i
        row = by_start.get(at)
        buckets.append(Bucket(at, row[1], row[2], row[3]) if row else Bucket(at, 0, 0, 0))
    return buckets


def svg(buckets: list[Bucket], *, label_format: str, title: str) -> str:
    width, height, left, right, top, bottom = 640, 220, 44, 44, 16, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((b.count for b in buckets), default=0) or 1
    step = plot_w / max(len(buckets), 1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'class="axis"/>',
        f'<text x="{left - 6}" y="{top + 4}" class="tick" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>',
        f'<text x="{left + plot_w + 6}" y="{top + 4}" class="tick">100%</text>',
        f'<text x="{left + plot_w + 6}" y="{top + plot_h}" class="tick">0%</text>',
    ]
    points = []
    label_every = max(1, len(buckets) // 8)
    for i, bucket in enumerate(buckets):
        x = left + i * step
        bar_h = plot_h * bucket.count / peak
        rate = bucket.success_rate
        tip = f"{bucket.start.strftime(label_format)}: {bucket.count} payments" + (
            f", {rate:.0%} succeeded" if rate is not None else ""
        )
        parts.append(
            f'<rect x="{x + step * 0.15:.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{step * 0.7:.1f}" height="{bar_h:.1f}" class="bar">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if rate is not None:
            points.append(f"{x + step / 2:.1f},{top + plot_h - plot_h * rate:.1f}")
        if i % label_every == 0:
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{height - 14}" class="tick" '
                f'text-anchor="middle">{escape(bucket.start.strftime(label_format))}</text>'
            )
    if len(points) > 1:
        parts.append(f'<polyline points="{" ".join(points)}" class="rate"/>')
    for point in points:
        x, y = point.split(",")
        parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" class="rate-dot"/>')
    parts.append("</svg>")
    return "".join(parts)
