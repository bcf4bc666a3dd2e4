"""Mirrors modules/interrogate.py: InterrogateModels.interrogate(PIL image) -> caption text.

The real one runs BLIP (and CLIP) on the GPU under the queue lock and returns "<error>" when it fails; this one
describes the image's size and main colour, so captions differ per image and tests can check them.
"""


class InterrogateModels:
    def __init__(self, content_dir="interrogate"):
        self.content_dir = content_dir
        self.calls = 0

    def interrogate(self, pil_image):
        self.calls += 1
        red, green, blue = pil_image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        colour = max((red, "red"), (green, "green"), (blue, "blue"))[1]
        return f"a {colour} picture, {pil_image.width}x{pil_image.height}"
