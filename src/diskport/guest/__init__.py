"""Guest inspection: what is inside a disk image and how it must boot, read without booting it.

Layers, each over the one below: :mod:`~diskport.guest.view` (guest bytes of any DiskImage, through a small
bounded cache), :mod:`~diskport.guest.volumes` (partition tables), :mod:`~diskport.guest.filesystems`
(superblock identification and read-only readers), :mod:`~diskport.guest.windows` (registry hives), then the
facts drawn from them and the advice drawn from the facts alone.
"""
