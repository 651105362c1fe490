"""Booting the disks the guest tests build, under qemu (TCG), to prove inspect_guest's verdicts.

SeaBIOS and OVMF decide whether a disk boots; a Debian kernel with a busybox initramfs on the disk says, on the
serial console, that it started and on which bus it found its root. Each test then asserts the verdict that
inspection gave for the same disk, so a wrong verdict and a wrong disk both fail.
"""
