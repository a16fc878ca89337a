"""Procedural overhead scenes with referring expressions: the embedded default data of crobim-u.

Every sample is a top-down "remote-sensing" scene drawn with numpy and PIL (textured ground, field
patches, shadows, sensor noise) plus one expression that refers to exactly one object in it
(`generate_scene` draws several about one scene, and `load_synthetic(expressions_per_image=K)` stores them as K
rows with one `image_id`). Scenes are seeded: the same seed gives the same bytes in every process.

Classes (11). Sizes in pixels at 256x256 and difficulty "medium" (length or side, d: diameter, w: width);
they scale with the image size and the difficulty:

| class            | drawn as                                     | size      | attribute words                  |
|------------------|----------------------------------------------|-----------|----------------------------------|
| road             | straight band across the scene, centre line  | w 5-11    | horizontal vertical diagonal     |
| building         | rectangle, gable or flat roof, shadow        | 12-68     | red grey white brown blue        |
| car              | box with windscreen, on a road or parked     | 5-7       | red white black grey blue yellow |
| truck            | longer box with a cab, on a road             | 11-16     | white red blue yellow green      |
| storage tank     | shaded circle, often in rows                 | d 8-26    | white grey                       |
| tennis court     | rectangle with white court lines             | 34-44     | green blue red                   |
| basketball court | rectangle with keys and centre circle        | 24-34     | orange blue green red            |
| tree             | clump of dark green crowns                   | d 6-18    | -                                |
| pond             | irregular polygon with a shore               | d 28-104  | blue green                       |
| plane            | fuselage, swept wings and tail, any heading  | 20-40     | white grey                       |
| ship             | pointed hull on a pond                       | 8-20      | white grey red black             |

Expression templates (brackets: optional attribute word; at most one discriminator):

    the [ATTR] CLASS                      only where it alone identifies the object
    the SIZE [ATTR] CLASS                 largest biggest smallest (3+ candidates), large big small (2)
    the EXTREME [ATTR] CLASS              leftmost rightmost topmost bottommost
    the [ATTR] CLASS REGION               on the left, at the top, in the top left, ..., in the center
    the [ATTR] CLASS RELATION REFERENCE   left of, to the left of, right of, to the right of, above,
                                          below, closest to, nearest to, farthest from + REFERENCE,
                                          the shortest non-relational expression of another object

The generator checks that each expression picks out exactly one object: size words need an area
ratio of 1.35 (1.5 between two), extremes and regions a margin of 5% of the image side, relations a
clear geometric separation, and every other candidate must fail a looser version of the same test.
Roads take orientation and extreme words only, and are references for "closest"/"farthest" only.

Difficulty is "easy" (0.0), "medium" (0.5, default), "hard" (1.0) or a float in between; it sets

| knob                                              | easy | medium | hard  |
|---------------------------------------------------|------|--------|-------|
| object size scale                                 | 1.2  | 1.0    | 0.8   |
| object count scale                                | 0.7  | 1.0    | 1.4   |
| targets drawn from classes with a distractor (aim)| 0.7  | 0.82   | 0.95  |
| weight of relational templates (the others: 1)    | 0.5  | 2.0    | 4.0   |
| bias to small targets (weight area^-b/2), b       | 0.0  | 0.5    | 1.0   |
| colour jitter / sensor noise (std, 0-255)         | 8/3  | 14/7   | 22/12 |

Each record also holds `class_mask`, the union of every object of the referred class: the answer of a
model that reads the class name only, which a referring model must beat where `has_distractor` is set;
`family`, the template family of its expression (class, attribute, size, extreme, region, relation), so that
a model can be scored per family; and `reference_mask`, the object a relational expression names (empty for
the other families).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageChops, ImageDraw


CLASSES = (
    "road",
    "building",
    "car",
    "truck",
    "storage tank",
    "tennis court",
    "basketball court",
    "tree",
    "pond",
    "plane",
    "ship",
)
COLOURS = {
    "red": (170, 55, 45),
    "white": (222, 222, 215),
    "black": (38, 38, 42),
    "grey": (128, 128, 125),
    "blue": (55, 85, 160),
    "green": (70, 125, 60),
    "yellow": (210, 185, 60),
    "orange": (205, 120, 50),
    "brown": (125, 85, 55),
}
PALETTES = {
    "building": ("red", "grey", "white", "brown", "blue"),
    "car": ("red", "white", "black", "grey", "blue", "yellow"),
    "truck": ("white", "red", "blue", "yellow", "green"),
    "storage tank": ("white", "grey"),
    "tennis court": ("green", "blue", "red"),
    "basketball court": ("orange", "blue", "green", "red"),
    "pond": ("blue", "green"),
    "plane": ("white", "grey"),
    "ship": ("white", "grey", "red", "black"),
}
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
SIZE_WORDS = {  # largest/smallest among three or more, large/small between two
    "largest": ("largest", "biggest"),
    "smallest": ("smallest",),
    "large": ("large", "big"),
    "small": ("small",),
}
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
REGIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left",
    "top right": "in the top right",
    "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
    "center": "in the center",
}
RELATIONS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
    "closest": ("closest to", "nearest to"),
    "farthest": ("farthest from",),
}
DIFFICULTIES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}
SPLITS = ("train", "validation", "test")
FEATURES = datasets.Features(  # the canonical record, then the extras of this data set
    {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "expression": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "category": datasets.Value("string"),
        "class_mask": datasets.Image(),
        "has_distractor": datasets.Value("bool"),
        "family": datasets.Value("string"),
        "reference_mask": datasets.Image(),
    }
)
# Template families, as `family` names them; `load_synthetic(families=...)` keeps some of them only.
FAMILIES = ("class", "attribute", "size", "extreme", "region", "relation")
_GROUNDS = ((96, 118, 70), (140, 128, 96), (118, 116, 104))  # grass, dry soil, urban


def synthetic_vocabulary() -> list[str]:
    """Every word any template can produce, sorted: a word-level tokenizer built from it covers the data."""
    phrases = [*CLASSES, *COLOURS, *ORIENTATIONS, *EXTREMES, *REGIONS.values(), "the"]
    phrases += [phrase for synonyms in (*SIZE_WORDS.values(), *RELATIONS.values()) for phrase in synonyms]
    return sorted({word for phrase in phrases for word in phrase.split()})


@dataclass(frozen=True)
class _Knobs:
    size_scale: float
    count_scale: float
    distractor_share: float
    relation_weight: float
    small_target_bias: float
    colour_jitter: float
    noise_std: float

    @classmethod
    def at(cls, difficulty: str | float, image_size: int) -> _Knobs:
        """The knobs of a difficulty level; checks the arguments of the public functions."""
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        t = DIFFICULTIES.get(difficulty, -1.0) if isinstance(difficulty, str) else float(difficulty)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)} or in [0, 1], got {difficulty!r}")

        def lerp(easy: float, medium: float, hard: float) -> float:
            return easy + (medium - easy) * 2 * t if t <= 0.5 else medium + (hard - medium) * (2 * t - 1)

        return cls(
            size_scale=lerp(1.2, 1.0, 0.8),
            count_scale=lerp(0.7, 1.0, 1.4),
            distractor_share=lerp(0.7, 0.82, 0.95),
            relation_weight=lerp(0.5, 2.0, 4.0),
            small_target_bias=lerp(0.0, 0.5, 1.0),
            colour_jitter=lerp(8, 14, 22),
            noise_std=lerp(3, 7, 12),
        )


@dataclass
class _Object:
    label: int  # value in the label map
    category: str
    adjective: str  # colour, or orientation for roads
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as drawn
    area: int = 0  # visible pixels
    cx: float = 0.0
    cy: float = 0.0
    pixels: np.ndarray | None = None  # flat indices of up to ~200 visible pixels

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


Points = list[tuple[float, float]]


def _rotate(points: Points, cx: float, cy: float, angle: float) -> Points:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _rectangle(x0: float, y0: float, w: float, h: float) -> Points:
    return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]


def _bounds(points: Points) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(c * factor))) for c in colour)


# Ground texture and sensor noise are drawn once per process from fixed seeds; each sample crops them
# at a random offset, which costs microseconds instead of milliseconds.


@functools.lru_cache(maxsize=8)
def _ground_tile(side: int, ground: tuple[int, int, int]) -> Image.Image:
    """Soil or grass with patches of +-15% brightness about 40 pixels (at 256) across."""
    brightness = np.random.default_rng(20260102).uniform(0.85, 1.15, (side // 42, side // 42, 1))
    return Image.fromarray((brightness * ground).astype(np.uint8)).resize((side, side), Image.BICUBIC)


@functools.lru_cache(maxsize=4)
def _noise_tile(side: int, std: float) -> Image.Image:
    """Sensor noise around 128: luminance grain plus a little colour grain."""
    rng = np.random.default_rng(20260103)
    grain = rng.normal(0, std, (side, side, 1)) + rng.normal(0, std / 3, (side, side, 3))
    return Image.fromarray((128 + grain).round().clip(0, 255).astype(np.uint8))


def _crop(tile: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    x, y = rng.integers(0, tile.width - size, 2).tolist()
    return tile.crop((x, y, x + size, y + size))


class _Canvas:
    """Paints colours into the image and object ids into a label map in one z-order, so occlusion is exact."""

    def __init__(self, rng: np.random.Generator, size: int, knobs: _Knobs):
        self.rng, self.size, self.knobs = rng, size, knobs
        self.scale = size / 256 * knobs.size_scale
        self.ground = _GROUNDS[rng.integers(len(_GROUNDS))]
        self.shade = _shade(self.ground, 0.5)  # shadows on the ground
        self.image = _crop(_ground_tile(2 * size, self.ground), size, rng)
        self.labels = Image.new("L", (size, size))
        self.paint, self.ink = ImageDraw.Draw(self.image), ImageDraw.Draw(self.labels)
        self.free = np.ones((64, 64), bool)  # coarse occupancy: cells are cheap to test, margins hide the rounding
        self.objects: list[_Object] = []
        self.roads: list[tuple[float, float, float, float]] = []  # centre x, y, angle, width

    def uniform(self, low: float, high: float) -> float:
        """A length drawn at this scene's scale."""
        return float(self.rng.uniform(low, high)) * self.scale

    def colour(self, name: str) -> tuple[int, int, int]:
        jitter = self.rng.normal(0, self.knobs.colour_jitter, 3).tolist()
        return tuple(min(255, max(0, int(c + d))) for c, d in zip(COLOURS[name], jitter))

    def new(self, category: str, box: tuple[float, float, float, float], adjective: str = "") -> _Object | None:
        if len(self.objects) >= 254:  # the label map is 8-bit
            return None
        if not adjective:
            adjective = PALETTES[category][self.rng.integers(len(PALETTES[category]))]
        self.objects.append(_Object(len(self.objects) + 1, category, adjective, box))
        return self.objects[-1]

    def reserve(self, width: float, height: float, margin: float) -> tuple[float, float] | None:
        """Top-left corner of a box at least `margin` away from roads and reserved boxes; None if none was found."""
        if max(width, height) > self.size - 2:
            return None
        cell = self.size / len(self.free)
        xs = self.rng.uniform(1, self.size - width - 1, 20).tolist()
        ys = self.rng.uniform(1, self.size - height - 1, 20).tolist()
        for x0, y0 in zip(xs, ys):
            rows = slice(max(0, int((y0 - margin) / cell)), int((y0 + height + margin) / cell) + 1)
            cols = slice(max(0, int((x0 - margin) / cell)), int((x0 + width + margin) / cell) + 1)
            if self.free[rows, cols].all():
                x1, y1 = int((x0 + width) / cell) + 1, int((y0 + height) / cell) + 1
                self.free[int(y0 / cell) : y1, int(x0 / cell) : x1] = False  # the box itself: margins do not add up
                return x0, y0
        return None

    def fill(self, points: Points, colour: tuple[int, ...], obj: _Object | None = None) -> None:
        self.paint.polygon(points, fill=colour)
        if obj is not None:
            self.ink.polygon(points, fill=obj.label)

    def shadow(self, points: Points, offset: float) -> None:
        self.paint.polygon([(x + offset, y + offset) for x, y in points], fill=self.shade)

    def fields(self) -> None:
        """Faint farmland patches: ground texture that belongs to no class."""
        for _ in range(int(self.rng.integers(0, 4))):
            x, y = self.rng.uniform(-0.2, 0.9, 2) * self.size
            w, h = self.rng.uniform(0.2, 0.6, 2) * self.size
            self.paint.rectangle([x, y, x + w, y + h], fill=_shade(self.ground, self.rng.uniform(0.85, 1.15)))

    def road(self) -> None:
        size, rng = self.size, self.rng
        if rng.random() < 0.7:  # most roads follow the grid
            angle = (math.pi / 2 * rng.integers(2) + rng.normal(0, 0.05)) % math.pi
        else:
            angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        c, s = math.cos(angle), math.sin(angle)
        reach = 0.9 * size / max(abs(c), abs(s))  # past the border from any centre
        ends = [(cx - c * reach, cy - s * reach), (cx + c * reach, cy + s * reach)]
        width = max(2.0, self.uniform(5, 11))
        degrees = math.degrees(angle)
        orientation = "vertical" if abs(degrees - 90) < 20 else "diagonal" if 20 <= degrees <= 160 else "horizontal"
        x0, y0, x1, y1 = _bounds(ends)
        box = (max(0, x0 - width / 2), max(0, y0 - width / 2), min(size, x1 + width / 2), min(size, y1 + width / 2))
        road = self.new("road", box, orientation)
        if road is None:
            return
        self.paint.line(ends, fill=_shade((92, 92, 96), rng.uniform(0.85, 1.15)), width=round(width))
        self.ink.line(ends, fill=road.label, width=round(width))
        cell = self.size / len(self.free)
        taken = Image.new("1", self.free.shape)
        kerb = round((width + 6 * self.scale) / cell) + 1  # the road plus a clearance on both sides
        ImageDraw.Draw(taken).line([(x / cell, y / cell) for x, y in ends], fill=1, width=kerb)
        self.free &= ~np.asarray(taken)
        if width >= 6:  # dashed centre line, over the part of the road inside the image
            dash = 5 * self.scale
            inside = [sorted(((0 - p) / d, (size - p) / d)) for p, d in ((cx, c), (cy, s)) if abs(d) > 1e-6]
            for t in np.arange(max(lo for lo, _ in inside), min(hi for _, hi in inside), 2 * dash).tolist():
                dash_ends = [(cx + c * t, cy + s * t), (cx + c * (t + dash), cy + s * (t + dash))]
                self.paint.line(dash_ends, fill=(200, 200, 190))
        self.roads.append((cx, cy, angle, width))

    def vehicle(self, category: str, cx: float, cy: float, angle: float, length: float, width: float) -> None:
        body = _rotate(_rectangle(-length / 2, -width / 2, length, width), cx, cy, angle)
        vehicle = self.new(category, _bounds(body))
        if vehicle is None:
            return
        colour = self.colour(vehicle.adjective)
        self.fill(body, colour, vehicle)
        front = 0.3 if category == "truck" else 0.25  # cab or windscreen
        self.fill(_rotate(_rectangle(length * (0.5 - front), -width / 2, length * front, width), cx, cy, angle),
                  _shade(colour, 1.15 if category == "truck" else 0.7))

    def road_vehicles(self, count: int) -> None:
        placed: list[tuple[float, float, float]] = []
        for _ in range(count * 4 if self.roads else 0):
            if len(placed) >= count:
                break
            cx, cy, angle, road_width = self.roads[self.rng.integers(len(self.roads))]
            truck = self.rng.random() < 0.25
            length = max(4.0, self.uniform(11, 16)) if truck else max(3.0, self.uniform(5, 7))
            width = min(road_width * 0.45, max(2.0, self.uniform(4, 5) if truck else self.uniform(2.5, 3.5)))
            t = self.rng.uniform(-0.7, 0.7) * self.size
            lane = (0.25 if self.rng.random() < 0.5 else -0.25) * road_width  # right-hand traffic, two lanes
            x = cx + math.cos(angle) * t - math.sin(angle) * lane
            y = cy + math.sin(angle) * t + math.cos(angle) * lane
            inside = length < x < self.size - length and length < y < self.size - length
            if inside and all(math.hypot(x - px, y - py) > (length + pl) / 2 + 1 for px, py, pl in placed):
                self.vehicle("truck" if truck else "car", x, y, angle + (math.pi if lane > 0 else 0.0), length, width)
                placed.append((x, y, length))

    def parking_lot(self) -> None:
        length, width = max(3.0, self.uniform(5, 7)), max(2.0, self.uniform(2.5, 3.5))
        stall, rows, cols = width * 1.8, int(self.rng.integers(1, 3)), int(self.rng.integers(4, 9))
        lot_w, lot_h = cols * stall + 4, rows * (length + 3) + 4
        corner = self.reserve(lot_w, lot_h, 3 * self.scale)
        if corner is None:
            return
        x0, y0 = corner
        asphalt = _shade((110, 110, 112), self.rng.uniform(0.9, 1.2))
        self.paint.rectangle([x0, y0, x0 + lot_w, y0 + lot_h], fill=asphalt)
        for row in range(rows):
            for col in range(cols):
                sx, sy = x0 + 2 + col * stall, y0 + 2 + row * (length + 3)
                self.paint.line([(sx, sy), (sx, sy + length + 1)], fill=(215, 215, 210))
                if self.rng.random() < 0.6:
                    self.vehicle("car", sx + stall / 2, sy + length / 2 + 0.5, math.pi / 2, length, width)

    def building(self) -> None:
        w, h = self.uniform(12, 68), self.uniform(12, 68)
        corner = self.reserve(w, h, 4 * self.scale)
        building = self.new("building", (*corner, corner[0] + w, corner[1] + h)) if corner else None
        if building is None:
            return
        x0, y0 = corner
        colour = self.colour(building.adjective)
        self.shadow(_rectangle(x0, y0, w, h), 3 * self.scale)
        self.fill(_rectangle(x0, y0, w, h), colour, building)
        if self.rng.random() < 0.6:  # gable roof: the two slopes catch the sun differently
            self.fill(_rectangle(x0, y0, w, h / 2) if w >= h else _rectangle(x0, y0, w / 2, h), _shade(colour, 1.18))
        else:  # flat roof: parapet and a few roof units
            inset = max(1.0, 2 * self.scale)
            self.fill(_rectangle(x0 + inset, y0 + inset, w - 2 * inset, h - 2 * inset), _shade(colour, 0.9))
            for _ in range(int(self.rng.integers(0, 4))):
                ux, uy = x0 + self.rng.uniform(0.2, 0.7) * w, y0 + self.rng.uniform(0.2, 0.7) * h
                self.fill(_rectangle(ux, uy, 2 * self.scale, 2 * self.scale), _shade(colour, 1.25))

    def tanks(self) -> None:
        radius = self.uniform(4, 13)
        count, pitch = int(self.rng.integers(1, 7)), radius * 2.6
        cols = min(count, int(self.rng.integers(1, 4)))
        corner = self.reserve(cols * pitch, math.ceil(count / cols) * pitch, 3 * self.scale)
        if corner is None:
            return
        for i in range(count):
            x0, y0 = corner[0] + (i % cols) * pitch, corner[1] + (i // cols) * pitch
            r = radius * (self.rng.uniform(0.8, 1.0) if self.rng.random() < 0.5 else 1.0)
            tank = self.new("storage tank", (x0, y0, x0 + 2 * r, y0 + 2 * r))
            if tank is None:
                return
            colour, offset = self.colour(tank.adjective), 2 * self.scale
            self.paint.ellipse([x0 + offset, y0 + offset, x0 + 2 * r + offset, y0 + 2 * r + offset], fill=self.shade)
            self.paint.ellipse(tank.box, fill=colour)
            self.ink.ellipse(tank.box, fill=tank.label)
            self.paint.ellipse([x0 + r * 0.35, y0 + r * 0.35, x0 + r * 1.65, y0 + r * 1.65], fill=_shade(colour, 0.88))

    def court(self, category: str) -> None:
        long = self.uniform(34, 44) if category == "tennis court" else self.uniform(24, 34)
        short = long * (0.48 if category == "tennis court" else 0.55)
        vertical = self.rng.random() < 0.5
        w, h = (short, long) if vertical else (long, short)
        corner = self.reserve(w, h, 3 * self.scale)
        court = self.new(category, (*corner, corner[0] + w, corner[1] + h)) if corner else None
        if court is None:
            return
        x0, y0 = corner
        line, inset, mx, my = (235, 235, 230), 0.1 * short, x0 + w / 2, y0 + h / 2
        self.fill(_rectangle(x0, y0, w, h), self.colour(court.adjective), court)
        self.paint.rectangle([x0 + inset, y0 + inset, x0 + w - inset, y0 + h - inset], outline=line)
        # Lines across the court in its own frame (u along the long side), mapped to the image.
        to_image = (lambda u, v: (mx + v, my + u)) if vertical else (lambda u, v: (mx + u, my + v))
        half_short = short / 2 - inset
        across = [0.0, -0.25 * long, 0.25 * long] if category == "tennis court" else [0.0]
        for u in across:
            self.paint.line([to_image(u, -half_short), to_image(u, half_short)], fill=line)
        if category == "basketball court":
            r = 0.15 * short
            self.paint.ellipse([mx - r, my - r, mx + r, my + r], outline=line)
            for end in (-1, 1):  # the keys under the baskets
                corners = [to_image(end * (long / 2 - inset), -r), to_image(end * (0.3 * long - inset), r)]
                (ax, ay), (bx, by) = corners
                self.paint.rectangle([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], outline=line)

    def tree(self) -> None:
        radius = max(2.0, self.uniform(3, 9))
        corner = self.reserve(2 * radius, 2 * radius, 2 * self.scale)
        tree = self.new("tree", (*corner, corner[0] + 2 * radius, corner[1] + 2 * radius), "green") if corner else None
        if tree is None:
            return
        cx, cy, offset = corner[0] + radius, corner[1] + radius, 2 * self.scale
        dark = _shade((45, 85, 40), self.rng.uniform(0.8, 1.15))
        self.paint.ellipse([cx - radius + offset, cy - radius + offset, cx + radius + offset, cy + radius + offset],
                           fill=self.shade)
        for _ in range(int(self.rng.integers(2, 5))):  # crowns inside the reserved circle
            r = radius * self.rng.uniform(0.45, 0.7)
            dx, dy = self.rng.uniform(-1, 1, 2).tolist()
            x, y = cx + dx * (radius - r), cy + dy * (radius - r)
            self.paint.ellipse([x - r, y - r, x + r, y + r], fill=dark)
            self.ink.ellipse([x - r, y - r, x + r, y + r], fill=tree.label)
            self.paint.ellipse([x - r * 0.5, y - r * 0.6, x + r * 0.3, y + r * 0.2], fill=_shade(dark, 1.25))

    def pond(self) -> None:
        radius = self.uniform(20, 52)
        corner = self.reserve(2 * radius, 2 * radius, 3 * self.scale)
        if corner is None:
            return
        cx, cy = corner[0] + radius, corner[1] + radius
        n = int(self.rng.integers(9, 16))
        # Jittered, evenly spread vertices at 0.7-1.0 radius: the shore stays beyond 0.55 radius.
        angles = (np.arange(n) + self.rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n
        radii = radius * self.rng.uniform(0.7, 1.0, n)
        shore = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
        pond = self.new("pond", _bounds(shore))
        if pond is None:
            return
        water = tuple(int(0.55 * c + d) for c, d in zip(self.colour(pond.adjective), (14, 27, 40)))  # dark, bluish
        self.paint.polygon(shore, fill=water, outline=_shade(self.ground, 1.2), width=max(1, round(2 * self.scale)))
        self.ink.polygon(shore, fill=pond.label)
        ships: list[tuple[float, float, float]] = []
        for _ in range(int(self.rng.integers(0, 4))):  # ships, within 0.55 radius
            length = max(4.0, self.uniform(8, 20))
            a, d = self.rng.uniform(0, 2 * math.pi), self.rng.uniform(0, max(0.0, 0.55 * radius - length / 2))
            x, y = cx + d * math.cos(a), cy + d * math.sin(a)
            if length > radius or any(math.hypot(x - sx, y - sy) < (length + sl) / 2 + 1 for sx, sy, sl in ships):
                continue
            hull = [(-0.5, -0.15), (0.3, -0.15), (0.5, 0), (0.3, 0.15), (-0.5, 0.15)]
            hull = _rotate([(u * length, v * length) for u, v in hull], x, y, self.rng.uniform(0, 2 * math.pi))
            ship = self.new("ship", _bounds(hull))
            if ship is not None:
                self.fill(hull, self.colour(ship.adjective), ship)
                ships.append((x, y, length))

    def plane(self) -> None:
        length = self.uniform(20, 40)
        corner = self.reserve(length, length, 3 * self.scale)
        if corner is None:
            return
        cx, cy, heading = corner[0] + length / 2, corner[1] + length / 2, self.rng.uniform(0, 2 * math.pi)
        parts = [  # fuselage, swept wings, tailplane; in half-lengths, nose at +1
            [(-1, -0.12), (0.85, -0.12), (1, 0), (0.85, 0.12), (-1, 0.12)],
            [(0.2, 0), (-0.25, -0.95), (-0.45, -0.95), (-0.2, 0), (-0.45, 0.95), (-0.25, 0.95)],
            [(-0.75, 0), (-0.95, -0.35), (-1, -0.35), (-0.95, 0), (-1, 0.35), (-0.95, 0.35)],
        ]
        parts = [_rotate([(u * length / 2, v * length / 2) for u, v in part], cx, cy, heading) for part in parts]
        plane = self.new("plane", _bounds([p for part in parts for p in part]))
        if plane is None:
            return
        colour = self.colour(plane.adjective)
        for part in parts:
            self.shadow(part, 2 * self.scale)
        for part in parts:
            self.fill(part, colour, plane)

    def compose(self) -> None:
        """Lays out a scene: roads first, then the things that claim space, vehicles last on the roads."""
        rng = self.rng

        def count(low: int, high: int, chance: float = 1.0) -> int:
            return round(rng.integers(low, high + 1) * self.knobs.count_scale) if rng.random() < chance else 0

        self.fields()
        for _ in range(max(1, count(1, 3))):
            self.road()
        for _ in range(count(1, 2, 0.45)):
            self.pond()
        if rng.random() < 0.5:
            self.parking_lot()
        for _ in range(count(2, 8)):
            self.building()
        for _ in range(count(1, 2, 0.5)):
            self.tanks()
        for category in ("tennis court", "basketball court"):
            for _ in range(count(1, 2, 0.35)):
                self.court(category)
        for _ in range(count(1, 3, 0.3)):
            self.plane()
        for _ in range(count(2, 12)):
            self.tree()
        self.road_vehicles(count(2, 10))

    def finish(self) -> Image.Image:
        """Adds sensor noise and measures every object's visible pixels in the label map."""
        noise = _crop(_noise_tile(2 * self.size, round(self.knobs.noise_std, 1)), self.size, self.rng)
        image = ImageChops.add(self.image, noise, 1.0, -128)
        counts = np.array(self.labels.histogram()[: len(self.objects) + 1])
        # Pixels grouped by object (a radix sort on uint8), background dropped.
        inside = np.argsort(np.asarray(self.labels).ravel(), kind="stable")[counts[0] :]
        ys, xs = np.divmod(inside, self.size)
        ends = np.cumsum(counts[1:])  # per-object sums as differences of running sums, robust to empty objects
        sums_x, sums_y = (np.concatenate([[0], np.cumsum(v)])[ends] for v in (xs, ys))
        starts, areas = (ends - counts[1:]).tolist(), counts[1:].tolist()
        sums = zip(np.diff(sums_x, prepend=0).tolist(), np.diff(sums_y, prepend=0).tolist())
        for obj, start, area, (sx, sy) in zip(self.objects, starts, areas, sums):
            obj.area = area
            if area:
                obj.cx, obj.cy = sx / area, sy / area
                obj.pixels = inside[start : start + area : max(1, area // 200)]
        return image


def _size_words(target: _Object, others: list[_Object]) -> list[str]:
    ratio = 1.5 if len(others) == 1 else 1.35
    if target.area >= ratio * max(o.area for o in others):
        return ["large" if len(others) == 1 else "largest"]
    if target.area * ratio <= min(o.area for o in others):
        return ["small" if len(others) == 1 else "smallest"]
    return []


def _extreme_words(target: _Object, others: list[_Object], margin: float) -> list[str]:
    # The centroid must lead by the margin and the box edge must agree, so that a big box cannot overtake.
    leads = (
        lambda o: o.cx - target.cx >= margin and o.box[0] >= target.box[0],  # leftmost
        lambda o: target.cx - o.cx >= margin and o.box[2] <= target.box[2],  # rightmost
        lambda o: o.cy - target.cy >= margin and o.box[1] >= target.box[1],  # topmost
        lambda o: target.cy - o.cy >= margin and o.box[3] <= target.box[3],  # bottommost
    )
    return [word for word, lead in zip(EXTREMES, leads) if all(lead(o) for o in others)]


def _in_region(o: _Object, region: str, size: int, slack: float) -> bool:
    """Whether the centroid lies in the region shrunk by slack (grown where slack is negative)."""
    half = size / 2
    if region == "center":
        return max(abs(o.cx - half), abs(o.cy - half)) < size / 6 - slack
    sides = {
        "left": o.cx < half - slack,
        "right": o.cx > half + slack,
        "top": o.cy < half - slack,
        "bottom": o.cy > half + slack,
    }
    return all(sides[side] for side in region.split())


def _region_phrases(target: _Object, others: list[_Object], size: int, margin: float) -> list[str]:
    return [
        phrase
        for region, phrase in REGIONS.items()
        if _in_region(target, region, size, margin) and not any(_in_region(o, region, size, -margin) for o in others)
    ]


def _direction_holds(relation: str, o: _Object, ref: _Object, gap: float, strict: bool) -> bool:
    """`o` is left of/right of/above/below a compact `ref`: strictly for the target, loosely for the others."""
    horizontal = relation in ("left", "right")
    along, across = (o.cx, o.cy) if horizontal else (o.cy, o.cx)
    ref_across, ref_half = (ref.cy, ref.height / 2) if horizontal else (ref.cx, ref.width / 2)
    o_half = (o.height if horizontal else o.width) / 2
    if abs(across - ref_across) > ref_half + (0 if strict else o_half + 2 * gap):
        return False
    axis = 0 if horizontal else 1
    if relation in ("left", "above"):
        return o.box[axis + 2] <= ref.box[axis] if strict else along < ref.box[axis] + gap
    return o.box[axis] >= ref.box[axis + 2] if strict else along > ref.box[axis + 2] - gap


class _Describer:
    """Lists every expression that identifies one object of a scene, grouped by template family."""

    def __init__(self, objects: list[_Object], size: int, rng: np.random.Generator):
        self.objects = [o for o in objects if o.area > 0]
        self.size, self.rng = size, rng
        self.margin, self.gap = 0.05 * size, 0.015 * size
        landmarks = [o for o in self.objects if o.area >= 8]
        # Ten random references per scene keep the relation search cheap.
        self.landmarks = [landmarks[i] for i in np.sort(rng.permutation(len(landmarks))[:10])]
        self.references: dict[int, list[str] | None] = {}
        self.distances: dict[tuple[int, str], dict[int, float]] = {}
        self.reference_of: dict[tuple[str, ...], int] = {}  # relational expression -> its reference object's label

    def options(self, target: _Object, relations: bool = True) -> dict[str, list[list[str]]]:
        same = [o for o in self.objects if o.category == target.category]
        found: dict[str, list[list[str]]] = {}
        for use_attribute in (False, True) if target.category in PALETTES or target.category == "road" else (False,):
            candidates = [o for o in same if not use_attribute or o.adjective == target.adjective]
            others = [o for o in candidates if o is not target]
            head = ([target.adjective] if use_attribute else []) + target.category.split()
            if not others:
                found.setdefault("attribute" if use_attribute else "class", []).append(["the", *head])
            else:
                if target.category != "road":
                    for word in _size_words(target, others):
                        found.setdefault("size", []).append(["the", self.pick(SIZE_WORDS[word]), *head])
                for word in _extreme_words(target, others, self.margin):
                    found.setdefault("extreme", []).append(["the", word, *head])
            if not relations or target.category == "road":
                continue
            for phrase in _region_phrases(target, others, self.size, self.margin):
                found.setdefault("region", []).append(["the", *head, *phrase.split()])
            for ref in self.landmarks:
                if ref.category == target.category:
                    continue
                for relation in self.relations(target, others, same, ref):
                    reference = self.reference(ref)
                    if reference:
                        phrase = self.pick(RELATIONS[relation]).split()
                        words = ["the", *head, *phrase, *reference]
                        found.setdefault("relation", []).append(words)
                        self.reference_of[tuple(words)] = ref.label
        return found

    def relations(self, target: _Object, others: list[_Object], same: list[_Object], ref: _Object) -> list[str]:
        found = []
        if ref.category != "road":
            for relation in ("left", "right", "above", "below"):
                if _direction_holds(relation, target, ref, self.gap, True) and not any(
                    _direction_holds(relation, o, ref, self.gap, False) for o in others
                ):
                    found.append(relation)
        if others:
            distance = self.distance(ref, same)
            near, far = distance[target.label], [distance[o.label] for o in others]
            if near <= 0.6 * min(far) and min(far) - near >= 2 * self.gap:
                found.append("closest")
            if max(far) <= 0.7 * near and near - max(far) >= 3 * self.gap:
                found.append("farthest")
        return found

    def distance(self, ref: _Object, objects: list[_Object]) -> dict[int, float]:
        """Distance from each object's centroid to the nearest visible pixel of `ref`."""
        key = (ref.label, objects[0].category)
        if key not in self.distances:
            px, py = ref.pixels % self.size, ref.pixels // self.size
            centres = np.array([(o.cx, o.cy) for o in objects])
            squared = (px[None] - centres[:, :1]) ** 2 + (py[None] - centres[:, 1:]) ** 2
            self.distances[key] = dict(zip((o.label for o in objects), np.sqrt(squared.min(1)).tolist()))
        return self.distances[key]

    def reference(self, ref: _Object) -> list[str] | None:
        """The shortest non-relational expression of a reference object, if it has one."""
        if ref.label not in self.references:
            options = self.options(ref, relations=False)
            family = next((f for f in ("class", "attribute", "extreme", "size") if f in options), None)
            self.references[ref.label] = min(options[family], key=len) if family else None
        return self.references[ref.label]

    def pick(self, synonyms: tuple[str, ...]) -> str:
        return synonyms[self.rng.integers(len(synonyms))]


@dataclass
class _Choice:
    target: _Object
    expression: str
    family: str
    reference: int | None  # label of the object a relational expression names, else None


def _choose(canvas: _Canvas, families: tuple[str, ...] | None = None) -> _Choice | None:
    """
    Picks a target (from a class with a distractor in the set share of samples) and one of its expressions, from the
    template `families` only where given.
    """
    rng, knobs = canvas.rng, canvas.knobs
    describer = _Describer(canvas.objects, canvas.size, rng)
    counts: dict[str, int] = {}
    for o in describer.objects:
        counts[o.category] = counts.get(o.category, 0) + 1
    visible = [o for o in describer.objects if o.area >= max(4.0, 12 * canvas.scale**2)]
    crowded = [o for o in visible if counts[o.category] > 1]
    alone = [o for o in visible if counts[o.category] == 1]
    weights = {"class": 1.0, "attribute": 1.0, "size": 1.0, "extreme": 1.0, "region": 1.0}
    weights["relation"] = knobs.relation_weight
    for pool in [crowded, alone] if rng.random() < knobs.distractor_share else [alone, crowded]:
        if not pool:
            continue
        # Each class present is about equally likely (cars would dominate otherwise), small ones more so on hard.
        preference = np.array([o.area ** (-knobs.small_target_bias / 2) / counts[o.category] for o in pool])
        for i in rng.choice(len(pool), size=min(len(pool), 8), replace=False, p=preference / preference.sum()):
            options = describer.options(pool[i])
            if families is not None:
                options = {family: phrases for family, phrases in options.items() if family in families}
            if options:
                names = sorted(options)
                p = np.array([weights[f] for f in names])
                family = names[rng.choice(len(names), p=p / p.sum())]
                words = options[family][rng.integers(len(options[family]))]
                reference = describer.reference_of.get(tuple(words)) if family == "relation" else None
                return _Choice(pool[i], " ".join(words), family, reference)
    return None


def generate_scene(
    rng_or_seed: np.random.Generator | int,
    image_size: int = 256,
    difficulty: str | float = "medium",
    num_expressions: int = 1,
    families: tuple[str, ...] | None = None,
) -> list[dict]:
    """
    Draws one overhead scene and `num_expressions` referring expressions, each identifying exactly one object in it.

    The first expression is the one `generate_sample` gives for the same stream. The others are drawn the same way,
    from the same stream, and differ from the ones before in target or in wording, where the scene allows (a scene
    with fewer distinct expressions than asked repeats them, so that every scene has `num_expressions`).

    Args:
        rng_or_seed (`np.random.Generator` or `int`):
            Source of randomness; an int seeds a fresh `np.random.default_rng`, so the same int gives the
            same bytes.
        image_size (`int`, *optional*, defaults to 256):
            Side of the square image in pixels; object sizes scale with it.
        difficulty (`str` or `float`, *optional*, defaults to `"medium"`):
            `"easy"`, `"medium"`, `"hard"` or a float in [0, 1] (see the module docstring).
        num_expressions (`int`, *optional*, defaults to 1):
            Expressions about the scene.
        families (`tuple[str]`, *optional*):
            Template families to draw from (of `FAMILIES`); by default all. A scene with no expression of these
            families is redrawn.

    Returns:
        `list[dict]`, one per expression, each with `image` (PIL RGB, one object shared by all), `mask` (PIL "L",
        0/1: the referred object), `class_mask` (PIL "L", 0/1: every object of the referred class), `expression`
        (`str`), `category` (`str`), `has_distractor` (`bool`: another object of the referred class is visible),
        `family` (`str`, the template family) and `reference_mask` (PIL "L", 0/1: the object a relational expression
        names, empty for the other families). `load_synthetic` adds `image_id` and `split`.
    """
    if not isinstance(num_expressions, int) or num_expressions < 1:
        raise ValueError(f"num_expressions must be a positive int, got {num_expressions!r}.")
    families = _check_families(families)
    knobs = _Knobs.at(difficulty, image_size)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    chosen = None
    while chosen is None:  # a scene where nothing can be described is redrawn from the same stream
        canvas = _Canvas(rng, image_size, knobs)
        canvas.compose()
        image = canvas.finish()
        chosen = _choose(canvas, families)
    picks = {(chosen.target.label, chosen.expression): chosen}
    for _ in range(4 * (num_expressions - 1)):  # a bounded search: small scenes have few distinct expressions
        if len(picks) == num_expressions:
            break
        another = _choose(canvas, families)
        if another is not None:
            picks.setdefault((another.target.label, another.expression), another)
    samples = []
    for choice in itertools.islice(itertools.cycle(picks.values()), num_expressions):
        target = choice.target
        same = [o.label for o in canvas.objects if o.category == target.category and o.area > 0]
        samples.append({
            "image": image,
            "mask": canvas.labels.point([int(v == target.label) for v in range(256)]),
            "class_mask": canvas.labels.point([int(v in same) for v in range(256)]),
            "expression": choice.expression,
            "category": target.category,
            "has_distractor": len(same) > 1,
            "family": choice.family,
            "reference_mask": canvas.labels.point([int(v == choice.reference) for v in range(256)]),
        })
    return samples


def _check_families(families: tuple[str, ...] | list[str] | None) -> tuple[str, ...] | None:
    if families is None:
        return None
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [family for family in families if family not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty selection of {FAMILIES}, got {families!r}.")
    return families


def generate_sample(
    rng_or_seed: np.random.Generator | int, image_size: int = 256, difficulty: str | float = "medium"
) -> dict:
    """
    Draws one overhead scene and one referring expression that identifies exactly one object in it: the first (and
    only) record of `generate_scene(rng_or_seed, image_size, difficulty)`, whose docstring has the arguments and the
    fields.
    """
    return generate_scene(rng_or_seed, image_size, difficulty)[0]


def _encode(image: Image.Image) -> dict:
    # A noisy scene takes ~15x longer to write as PNG than as JPEG, the format of most remote-sensing
    # benchmarks; masks must stay exact: PNG with run-length zlib, fast and ~200 bytes for a 0/1 mask.
    buffer = io.BytesIO()
    if image.mode == "RGB":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return {"bytes": buffer.getvalue(), "path": None}


def _generate_split(
    split: str, scenes: list[tuple[int, int]], image_size: int, difficulty: str | float, seed: int,
    expressions_per_image: int, families: tuple[str, ...] | None,
):
    for index, rows in scenes:
        # One stream per (seed, split, scene index): splits are disjoint, independent of each other's sizes,
        # and any scene can be regenerated alone.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        samples = generate_scene(rng, image_size, difficulty, expressions_per_image, families)
        image = _encode(samples[0]["image"])
        for sample in samples[:rows]:  # the split's last scene may give fewer rows than the others
            yield {
                **sample,
                "image": image,
                **{key: _encode(sample[key]) for key in ("mask", "class_mask", "reference_mask")},
                "image_id": f"synthetic-{difficulty}-{seed}-{split}-{index:06d}",
                "split": split,
            }


def load_synthetic(
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
    image_size: int = 256,
    difficulty: str | float = "medium",
    seed: int = 0,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    expressions_per_image: int = 1,
    families: tuple[str, ...] | None = None,
) -> datasets.DatasetDict:
    """
    Builds the synthetic referring-segmentation benchmark: `train`, `validation` and `test` splits of
    canonical records (the fields of `generate_sample` plus `image_id` and `split`). With
    `expressions_per_image` above 1, consecutive rows share a scene (and its `image_id`), as in the
    benchmarks, where most images carry several expressions.

    Images are stored as JPEG (quality 95), masks as PNG.

    Args:
        num_train (`int`, *optional*, defaults to 2000): Rows in the train split.
        num_validation (`int`, *optional*, defaults to 200): Rows in the validation split.
        num_test (`int`, *optional*, defaults to 200): Rows in the test split.
        image_size (`int`, *optional*, defaults to 256): Side of the square images in pixels.
        difficulty (`str` or `float`, *optional*, defaults to `"medium"`): See the module docstring.
        seed (`int`, *optional*, defaults to 0):
            Base seed. Row `i` of a split depends only on (seed, split, i, image_size, difficulty), so
            changing `num_train` leaves the other splits unchanged.
        cache_dir (`str`, *optional*): `datasets` cache folder; defaults to the `datasets` cache.
        num_proc (`int`, *optional*):
            Processes that generate each split. By default one per CPU core for splits of 500 rows or more
            (starting them costs a fraction of a second), one for smaller splits.
        expressions_per_image (`int`, *optional*, defaults to 1):
            Rows per scene (see `generate_scene`); a split's row count need not be a multiple of it (its last
            scene then gives fewer rows). With 1, row `i` is scene `i`.
        families (`tuple[str]`, *optional*):
            Keep expressions of these template families only (of `FAMILIES`: class, attribute, size, extreme, region,
            relation), e.g. `("relation", "size")` for a split that tests relations and comparisons. Scenes are drawn
            from the same streams; where a scene has no such expression, the next scene of its stream is drawn.

    Returns:
        `datasets.DatasetDict`. The cache is keyed on the arguments and on this file's source, so an edit
        to the generator never serves stale samples.
    """
    _Knobs.at(difficulty, image_size)  # fail before any work on bad arguments
    if not isinstance(expressions_per_image, int) or expressions_per_image < 1:
        raise ValueError(f"expressions_per_image must be a positive int, got {expressions_per_image!r}.")
    families = _check_families(families)
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    splits = {}
    for split, count in zip(SPLITS, (num_train, num_validation, num_test)):
        if count == 0:  # `from_generator` cannot build an empty split
            splits[split] = datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES, split=split)
            continue
        key = f"{source}-{split}-{count}-{image_size}-{difficulty}-{seed}-{expressions_per_image}-{families}"
        per_scene = expressions_per_image
        splits[split] = datasets.Dataset.from_generator(
            _generate_split,
            features=FEATURES,
            gen_kwargs={
                "split": split,
                # (scene index, rows) pairs, a list so that `num_proc` shards it
                "scenes": [(i, min(per_scene, count - i * per_scene)) for i in range(-(-count // per_scene))],
                "image_size": image_size,
                "difficulty": difficulty,
                "seed": seed,
                "expressions_per_image": per_scene,
                "families": families,
            },
            cache_dir=cache_dir,
            num_proc=num_proc if num_proc is not None else (os.cpu_count() if count >= 500 else None),
            split=datasets.NamedSplit(split),
            fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        )
    return datasets.DatasetDict(splits)
