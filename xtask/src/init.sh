#!/bin/sh
# /init of Quicksilver's test initramfs (from xtask/src/init.sh, packed by `cargo xtask build`).
#
# What the tests rely on, on the console (ttyS0):
#   QS-INIT                                      the kernel reached userspace (this script)
#   QS-LOADED | QS-LOAD-FAILED ... | QS-NOLOAD   the agent module was loaded, failed, or skipped
#   QS-BOOTED                                    userspace is up, the agent step is done
#   QS-SCRIPT-EXIT <n>                           /qs/script.sh (added per run) exited with n;
#                                                the machine powers off right after
# Without /qs/script.sh an interactive shell runs on the console; leaving it powers off.
#
# Kernel command line: `qs.noload` skips loading the agent; `quicksilver.<param>=<value>` words
# are passed to insmod as `<param>=<value>` (busybox insmod does not read /proc/cmdline the
# way modprobe does).

echo "QS-INIT"
export PATH=/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# Every other busybox applet, for interactive use; existing entries are kept.
/bin/busybox --install -s /bin 2>/dev/null
hostname qs-guest

noload=
params=
for word in $(cat /proc/cmdline); do
    case "$word" in
        qs.noload) noload=1 ;;
        quicksilver.*=*) params="$params ${word#quicksilver.}" ;;
    esac
done

if [ -n "$noload" ]; then
    echo "QS-NOLOAD"
elif [ ! -e /lib/quicksilver/quicksilver.ko ] || [ ! -e /lib/quicksilver/hv.img ]; then
    echo "QS-LOAD-FAILED: this initramfs lacks the agent or the hv image (cargo xtask build reported why)"
elif insmod /lib/quicksilver/quicksilver.ko image=/lib/quicksilver/hv.img $params; then
    echo "QS-LOADED"
else
    echo "QS-LOAD-FAILED: insmod exited with $? (see dmesg)"
fi
echo "QS-BOOTED"

if [ -f /qs/script.sh ]; then
    cd /root
    sh /qs/script.sh
    echo "QS-SCRIPT-EXIT $?"
else
    echo "Quicksilver test guest. Leave with 'poweroff' or QEMU's Ctrl-A X."
    ENV=/etc/shrc PS1='qs-guest:$PWD# ' setsid cttyhack sh
fi
# A forced power-off does not wait for the console's tty to drain. QEMU's UART sends at once,
# so nothing was lost without this pause in practice; it is a cheap safeguard for loaded hosts.
sleep 0.2
poweroff -f
