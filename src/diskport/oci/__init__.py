"""containerDisk images: OCI layers, image layouts, docker-archives and a registry client.

``media`` holds the shared vocabulary (media types, descriptors, canonical JSON); ``layer`` writes the one
layer in one pass; ``layout`` and ``archive`` are the two on-disk outputs; ``registry`` and ``auth`` talk to a
distribution registry; ``build``, ``push`` and ``pull`` put them together for the command line.
"""
