"""GRUB for BIOS on a disk image: ``grub-mkimage -O i386-pc`` builds the core image, and the few bytes
``grub-bios-setup`` would write are written here, since grub-bios-setup refuses a plain file.

What gets written, by the offsets of GRUB's ``include/grub/i386/pc/boot.h`` (facts, not code):

- sector 0: boot.img's code (0x000-0x1B7), keeping the disk's own BPB area (0x03-0x59), disk signature,
  partition table and 0x55AA (0x1B8-0x1FF); the 8-byte LBA of core.img's first sector at 0x5C; the two-byte
  jump at 0x66 that skips the "a buggy BIOS passed a floppy drive number: use 0x80" fix-up turned into NOPs,
  as setup does for a hard disk;
- core.img itself, contiguous, at ``core_lba`` (1: the gap after the MBR; or the BIOS boot partition's start);
- in core.img's first sector (diskboot.img), the block list that ends the sector (at 0x1F4: 8-byte start LBA,
  2-byte sector count, 2-byte segment 0x820) set to the rest of core.img.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tests.support.clients import require_tool, run

GRUB_PC = Path("/usr/lib/grub/i386-pc")
SECTOR = 512
KERNEL_SECTOR_AT = 0x5C
DRIVE_CHECK_AT = 0x66
BPB = (0x03, 0x5A)
KEEP_FROM = 0x1B8
BLOCKLIST_AT = 0x1F4
CORE_SEGMENT = 0x820


def core_image(out: Path, config: Path, prefix: str, modules: tuple[str, ...]) -> Path:
    run(require_tool("grub-mkimage"), "-O", "i386-pc", "-o", out, "-c", config, "-p", prefix, *modules)
    return out


def install(disk: Path, core: Path, core_lba: int, room_sectors: int) -> None:
    """Write boot.img's code into ``disk``'s MBR and ``core`` at ``core_lba`` (where ``room_sectors`` fit)."""
    boot = (GRUB_PC / "boot.img").read_bytes()
    data = bytearray(core.read_bytes())
    sectors = -(-len(data) // SECTOR)
    if sectors > room_sectors:
        raise AssertionError(f"core.img is {sectors} sectors; only {room_sectors} fit at LBA {core_lba}")
    data += bytes(sectors * SECTOR - len(data))
    _start, count, segment = struct.unpack_from("<QHH", data, BLOCKLIST_AT)
    if segment != CORE_SEGMENT or count != sectors - 1:  # grub-mkimage fills in the length, not the start
        raise AssertionError(f"{core}: no block list at {BLOCKLIST_AT:#x} (segment {segment:#x}, "
                             f"{count} sectors)")
    struct.pack_into("<QHH", data, BLOCKLIST_AT, core_lba + 1, sectors - 1, CORE_SEGMENT)
    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        if mbr[510:512] != b"\x55\xaa":
            raise AssertionError(f"{disk}: write the partition table before GRUB")
        code = bytearray(boot[:KEEP_FROM])
        code[BPB[0]:BPB[1]] = mbr[BPB[0]:BPB[1]]
        struct.pack_into("<Q", code, KERNEL_SECTOR_AT, core_lba)
        if code[DRIVE_CHECK_AT] != 0xEB:  # jmp over the "use 0x80 if DL looks like a floppy" fix-up
            raise AssertionError(f"boot.img has {code[DRIVE_CHECK_AT]:#x} at {DRIVE_CHECK_AT:#x}, not a jmp")
        code[DRIVE_CHECK_AT:DRIVE_CHECK_AT + 2] = b"\x90\x90"
        mbr[:KEEP_FROM] = code
        f.seek(0)
        f.write(mbr)
        f.seek(core_lba * SECTOR)
        f.write(data)
