"""The notebook tier: IPython magics, cells as prompt material, how answers are shown.

Built on the client and supervisor tiers; never the engine or server tiers.
"""
