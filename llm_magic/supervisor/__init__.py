"""The supervisor tier: the kernel-side life of a host (``ApiHost``), its cloudflared tunnel and
the snippets it prints. Standard library only (and the client tier): the host itself runs in a
child process.
"""
