"""The core layer: the compiled extension, backend choice, the op registry and argument checks.

Imports only torch (and the compiled extension); every other bitpress module may import it.
"""
