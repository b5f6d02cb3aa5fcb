"""hoard's Nova scheduler weigher: prefer hosts that hold the image's working set.

See weigher.HoardWeigher and README.md.
"""
