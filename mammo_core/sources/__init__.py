"""Where data and weights come from: TCIA downloads, safe zip extraction, the phantom,
pretrained-weight download and its sources.

Modules:
- ``phantom``: A deterministic, realistic CBIS-DDSM twin written from a seed (DESIGN.md section 6).
- ``phantom_render``: Pixel rendering for the phantom CBIS-DDSM twin: breast, parenchyma, masses, calcifications, noise.
- ``safe_zip``: Extract a zip archive that came from the network without trusting its entry names.
- ``tcia``: Download a TCIA collection (CBIS-DDSM by default) through the public NBIA REST API.
- ``weight_sources``: Which pretrained weights a stage will actually start from, for its key.
- ``weights_fetch``: The one explicit download of pretrained weights: torchvision's files into the local torch hub
  cache.
"""
