"""The world's fixed vocabulary (docs/miniature-world.md): anyone who renders these names with these
colours draws a scene "in the world", so that models can be tested on scenes drawn by other renderers."""

from __future__ import annotations

CANVAS = 64  # pixels, square

SHAPES = ("circle", "square", "triangle", "star", "heart")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "purple": (140, 50, 180),
    "pink": (240, 130, 200),
    "brown": (120, 75, 35),
}

BACKGROUNDS = ("white", "gray", "black", "sand", "sky", "grass")
FLAT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "sand": (225, 205, 160),
}
SKY_TOP, SKY_BOTTOM = (120, 170, 235), (200, 225, 250)  # vertical gradient
GRASS, GRASS_STRIPE, GRASS_PERIOD = (70, 140, 60), (50, 110, 45), 4  # darker stripe every 4 px

# "none" is a scene without a global style. Styles are applied last, to the whole image.
STYLES = ("none", "night", "bw", "snowy")
NIGHT_SCALE, NIGHT_BLUE = 0.35, 25.0
LUMA = (0.299, 0.587, 0.114)
SNOW_RGB, SNOW_FRACTION = (250, 250, 250), 0.03

# Object sizes: the side of the object's bounding box in pixels.
SIZES: dict[str, tuple[float, float]] = {"small": (10.0, 14.0), "large": (22.0, 30.0)}
SIZE_SPLIT = 18.0  # a box side below this reads as small

# Named positions: thirds of the canvas (by the object's centre).
HPOS = ("left", "center", "right")
VPOS = ("top", "middle", "bottom")
