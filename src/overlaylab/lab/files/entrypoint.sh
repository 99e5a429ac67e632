#!/bin/sh
# overlaylab lab host: PID 1 before systemd. Each function fixes one thing that a
# container lacks compared with a VM, then systemd takes over (kind does the same).
set -u

fix_mounts() {
    # Without --privileged, /sys and the cgroup hierarchies arrive read-only;
    # systemd and dockerd both need to write there.
    # The cgroup mounts are read-only per mount point: remount,bind clears that.
    mount -o remount,rw /sys 2>/dev/null || true
    for dir in /sys/fs/cgroup /sys/fs/cgroup/*; do
        mount -o remount,rw,bind "$dir" 2>/dev/null || mount -o remount,rw "$dir" 2>/dev/null || true
    done
}

unbind_etc_file() {
    # Docker bind-mounts /etc/hostname, /etc/hosts and /etc/resolv.conf; on a
    # bind mount hostnamectl fails "Device or resource busy". Keep the wanted
    # content ($2) in a plain file instead.
    file=$1 content=$2
    umount "$file" 2>/dev/null || true
    rm -f "$file"
    printf '%s\n' "$content" > "$file"
}

fix_etc_files() {
    name=$(cat /etc/hostname)  # what Docker gave the container (--hostname)
    # After a reboot, the name the host last had (hostnamectl may have changed it): the
    # plain file of the boot before lies under Docker's bind mount.
    if [ -e /etc/overlaylab/booted ] && umount /etc/hostname 2>/dev/null && [ -s /etc/hostname ]; then
        name=$(cat /etc/hostname)
    fi
    hosts=$(cat /etc/overlaylab/hosts 2>/dev/null || printf '127.0.0.1 localhost\n127.0.1.1 %s' "$name")
    unbind_etc_file /etc/hostname "$name"
    unbind_etc_file /etc/hosts "$hosts"
    # No DNS server: nothing in a lab host may reach outside the lab.
    unbind_etc_file /etc/resolv.conf "# overlaylab lab host: no DNS server outside the lab"
}

fix_interfaces() {
    # Docker attaches a restarted container's networks in no fixed order. Name each NIC
    # by the address lab-up gave it (/etc/overlaylab/interfaces: "eth0 10.210.0.11"), as
    # udev names a VM's NICs by MAC, so that eth1 stays the cluster interface across
    # reboots. Two passes (temporary names first), so that eth0 and eth1 can swap.
    [ -r /etc/overlaylab/interfaces ] || return 0
    while read -r want addr; do
        have=$(ip -o -4 addr show | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) print $2}')
        if [ -n "$have" ] && [ "$have" != "$want" ]; then
            ip link set dev "$have" down && ip link set dev "$have" name "t-$want"
        fi
    done < /etc/overlaylab/interfaces
    while read -r want addr; do
        if ip link show "t-$want" >/dev/null 2>&1; then
            ip link set dev "t-$want" name "$want" && ip link set dev "$want" up
        fi
    done < /etc/overlaylab/interfaces
}

wire_size() {
    # As lab-up does for a new host (lab/hosts.py, WIRE_SIZE): its cluster NIC sends packets of
    # at most its MTU, as a real NIC does, never a veth's 64 KiB super-packets, so that
    # lab-impair's length rules (--mtu) see what a wire would carry.
    if ip link show eth1 >/dev/null 2>&1; then ip link set gso_max_segs 1 dev eth1; fi
    return 0
}

isolate() {
    # No default route: traffic can only go to the lab's own networks.
    ip route del default 2>/dev/null || true
}

fix_ssh_key_owner() {
    [ -d /home/admin/.ssh ] && chown -R admin:admin /home/admin/.ssh && chmod 700 /home/admin/.ssh
    return 0
}

fix_mounts
fix_etc_files
fix_interfaces
wire_size
isolate
fix_ssh_key_owner
touch /etc/overlaylab/booted
exec /sbin/init "$@"
