"""The host collector's configuration section: where /proc, /sys and the root are, and which
file systems, disks and network interfaces it reports."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.configtypes import Regex, Section

# node_exporter's defaults: kernel and container-internal file systems carry no capacity signal.
DEFAULT_FS_TYPES_EXCLUDE = (
    r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs"
    r"|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs"
    r"|sysfs|tracefs)$"
)
DEFAULT_MOUNT_POINTS_EXCLUDE = (
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)


@dataclass(frozen=True)
class FilesystemConfig:
    """Which mounted file systems the host collector reports."""

    mount_points_include: Regex = Regex("")
    mount_points_exclude: Regex = Regex(DEFAULT_MOUNT_POINTS_EXCLUDE)
    fs_types_include: Regex = Regex("")
    fs_types_exclude: Regex = Regex(DEFAULT_FS_TYPES_EXCLUDE)


@dataclass(frozen=True)
class DeviceFilterConfig:
    """Which devices (disks or network interfaces) the host collector reports."""

    include: Regex = Regex("")
    exclude: Regex = Regex("")


@dataclass(frozen=True)
class HostConfig:
    """Host collector settings."""

    proc_path: str = "/proc"
    sys_path: str = "/sys"
    # Where the host's root file system is mounted: a container sees the host's mount table
    # through proc_path, and their sizes under this prefix (node_exporter's --path.rootfs).
    root_path: str = "/"
    filesystem: FilesystemConfig = FilesystemConfig()
    disk: DeviceFilterConfig = DeviceFilterConfig(exclude=Regex(r"^(ram|loop|fd|zram)\d+$"))
    network: DeviceFilterConfig = DeviceFilterConfig(
        exclude=Regex(r"^(veth.*|docker\d+|br-.*|cali.*|flannel.*|cni\d+)$")
    )


SECTION = Section(HostConfig, metric_prefixes=("qatoolbox_host_",))
