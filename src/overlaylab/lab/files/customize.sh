#!/bin/sh
# Runs inside a freshly debootstrapped root (chroot) to turn it into a lab host
# image. Per-host identity and the inner engine's daemon.json come at create time.
set -eu

# Units that touch real hardware or global kernel state of the machine running
# the lab (systemd-sysctl writes this VM's /proc/sys) have no place in a host.
for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service udev.service \
    getty.target getty@tty1.service console-getty.service serial-getty@.service container-getty@.service \
    systemd-remount-fs.service systemd-modules-load.service systemd-sysctl.service \
    apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
    systemd-binfmt.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
    systemd-journald-audit.socket systemd-hwdb-update.service systemd-firstboot.service \
    e2scrub_reap.service e2scrub_all.timer fstrim.timer systemd-timesyncd.service \
    systemd-networkd-wait-online.service sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-kernel-config.mount dev-hugepages.mount dev-mqueue.mount ldconfig.service \
    systemd-machine-id-commit.service; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done

# Identity is per host: lab-up writes machine-id and SSH host keys before boot.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*

# The admin user logs in with the lab's key only, and uses sudo without a password.
id admin >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /bin/bash admin
usermod -aG docker admin 2>/dev/null || true
passwd -l admin >/dev/null
echo 'admin ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/admin
chmod 440 /etc/sudoers.d/admin
mkdir -p /home/admin/.ssh /etc/overlaylab
cat > /etc/ssh/sshd_config.d/overlaylab.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
CONF

# Swarm tasks try a registry first; there is none. docker.service reads this
# file, so no drop-in of the lab's competes with the provisioner's own.
echo 'DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1' >> /etc/default/docker

# Smaller image: caches, docs and apt lists are not needed at run time.
apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/info/* \
    /usr/share/locale/* /var/log/*.log /var/cache/debconf/*-old
