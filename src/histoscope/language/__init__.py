"""Language models over pathology images: image–text alignment (CLIP/CoCa, CONCH).

:mod:`histoscope.language.align` holds the image–text models, their registry, losses,
tokenizers and zero-shot classification.
"""
