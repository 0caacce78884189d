#!/bin/sh
# provisioner: /init of every image's busybox initramfs (built by provisioner/images).
#
# Reads its parameters from the kernel command line (provisioner.node, .role, .version,
# .callback, .token, and .rootfs for images with a root file system), loads the NIC drivers,
# gets an address by DHCP, and applies the node's overlay (the extra initrd the boot endpoint
# serves to this node only, unpacked by the kernel under /provisioner/overlay) and its secret part
# (provisioner.secrets: fetched here, as root, once per boot, from a privileged source port, with
# this boot's token; docs/security.md). Then either:
#   - with provisioner.rootfs=URL: fetches the squashfs root into RAM, mounts it read-only under a
#     tmpfs overlay, copies the overlay files in and switches to its /sbin/init (systemd), whose
#     provisioner-callback.service calls back once the node's services run; or
#   - without: stays in the initramfs (the tiny test image): prints PROVISIONER-BOOTED on the
#     console, posts the boot callback and stays up.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /var/run

say() { echo "provisioner: $*"; }

# The value of KEY=VALUE on the kernel command line (values never contain spaces).
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

NODE=$(arg provisioner.node)
ROLE=$(arg provisioner.role)
VERSION=$(arg provisioner.version)
CALLBACK=$(arg provisioner.callback)
TOKEN=$(arg provisioner.token)
ROOTFS=$(arg provisioner.rootfs)
SECRETS=$(arg provisioner.secrets)

# Drivers in dependency order (the image builder wrote the list).
if [ -f /etc/provisioner/modules ]; then
    while read -r m; do
        [ -n "$m" ] || continue
        insmod "/lib/modules/provisioner/$m.ko" 2>/dev/null || say "module $m not loaded"
    done < /etc/provisioner/modules
fi

# Copies the overlay's files (not its directories: the image's own modes and owners stay) to $1.
OVERLAY=no
apply_overlay() {
    [ -d /provisioner/overlay ] || return 0
    OVERLAY=yes
    (cd /provisioner/overlay && find . ! -type d) | while read -r f; do
        mkdir -p "$1/${f%/*}"
        cp -p "/provisioner/overlay/$f" "$1/$f"
    done
}

ifconfig lo 127.0.0.1 up
IFACE=
IP=
net_up() {
    tries=0
    while [ $tries -lt 30 ]; do
        for dev in /sys/class/net/*; do
            n=${dev##*/}
            [ "$n" = lo ] && continue
            ifconfig "$n" up 2>/dev/null
            if udhcpc -i "$n" -s /etc/provisioner/udhcpc.sh -n -q -t 3 -T 2 >/dev/null 2>&1; then
                IFACE=$n
                IP=$(cat "/run/provisioner-ip.$n" 2>/dev/null)
                return 0
            fi
        done
        tries=$((tries + 1))
        sleep 1
    done
    return 1
}
net_up || say "no DHCP answer on any interface"

# The overlay's secret part (provisioner.secrets): fetched as root before any user process exists,
# from a source port below 1024 (the boot server answers only such a request, as only root can
# send one) with curl --local-port: the image root's curl (chroot, before switch_root), or one on
# PATH. Without curl, busybox wget (an ordinary port: only for sites that turned
# site.secrets_privileged_port off). The body is base64; it is unpacked into /provisioner (0700)
# next to the public part, and apply_overlay copies both into place.
SECRETS_OK=none
fetch_secrets() {
    [ -n "$SECRETS" ] || return 0
    T=${PROVISIONER_TMP:-/run}; D=${PROVISIONER_DEST:-/}  # set only by the test that runs this on a host
    url="$SECRETS?token=$TOKEN&version=$VERSION"
    tries=0
    while [ $tries -lt 15 ]; do
        tries=$((tries + 1))
        rm -f "$T/secrets.out" "$T/secrets.err"
        if [ -x "$1/usr/bin/curl" ] || { [ -z "$1" ] && command -v curl >/dev/null; }; then
            [ -n "$1" ] && mount --bind /dev "$1/dev"  # curl's libraries want /dev/urandom
            ${1:+chroot "$1"} curl -s -m 30 --local-port 600-1023 -w '\n%{http_code}' "$url" > "$T/secrets.out" 2>/dev/null
            [ -n "$1" ] && umount "$1/dev"
            status=$(tail -n 1 "$T/secrets.out"); sed -i '$d' "$T/secrets.out"
        else
            wget -q -S -O "$T/secrets.out" "$url" 2> "$T/secrets.err"
            status=$(grep -o 'HTTP/[0-9.]* [0-9]*' "$T/secrets.err" | tail -n 1 | cut -d' ' -f2)
        fi
        case "$status" in
            200)
                mkdir -p "$D/provisioner" && chmod 0700 "$D/provisioner"
                if base64 -d < "$T/secrets.out" | gunzip -c > "$T/secrets.cpio" \
                        && (cd "$D" && cpio -i -d -m -u < "$T/secrets.cpio" 2>/dev/null); then
                    SECRETS_OK=yes
                else
                    SECRETS_OK=broken
                fi
                rm -f "$T/secrets.out" "$T/secrets.err" "$T/secrets.cpio"
                return 0 ;;
            403|404|409)
                say "secrets refused: $(head -c 300 "$T/secrets.out")"
                SECRETS_OK=refused
                rm -f "$T/secrets.out" "$T/secrets.err"
                return 0 ;;
        esac
        sleep 2
    done
    rm -f "$T/secrets.out" "$T/secrets.err"
    say "cannot fetch the secrets from $SECRETS"
    SECRETS_OK=unreachable
}

if [ -n "$ROOTFS" ]; then
    say "fetching the root file system $ROOTFS"
    mkdir -p /newroot /ro /rw
    until wget -q -O /rootfs.squashfs "$ROOTFS"; do
        say "cannot fetch the root file system; retrying in 5 s"
        rm -f /rootfs.squashfs
        sleep 5
    done
    mount -t squashfs -o loop,ro /rootfs.squashfs /ro || { say "cannot mount the root file system"; sleep 30; reboot -f; }
    mount -t tmpfs -o mode=0755 tmpfs /rw
    mkdir -p /rw/upper /rw/work
    mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot \
        || { say "cannot mount the overlay root"; sleep 30; reboot -f; }
    fetch_secrets /newroot
    echo "PROVISIONER-SECRETS node=$NODE $SECRETS_OK"
    apply_overlay /newroot
    rm -rf /provisioner/overlay
    [ -s /etc/resolv.conf ] && cp /etc/resolv.conf /newroot/etc/resolv.conf
    # Hand the NIC over as the kernel found it: udev in the root can only rename an interface
    # that is down, and systemd-networkd waits forever for one udev could not set up.
    [ -n "$IFACE" ] && { ip addr flush dev "$IFACE"; ip link set "$IFACE" down; }
    say "node=$NODE role=$ROLE version=$VERSION overlay=$OVERLAY: starting the image's init"
    for m in dev proc sys; do mount --move "/$m" "/newroot/$m"; done
    exec switch_root /newroot /sbin/init
fi

# The tiny test image stays here.
fetch_secrets
echo "PROVISIONER-SECRETS node=$NODE $SECRETS_OK"
apply_overlay /
rm -rf /provisioner/overlay
if [ -s /etc/hostname ]; then hostname "$(cat /etc/hostname)"; elif [ -n "$NODE" ]; then hostname "$NODE"; fi
echo "PROVISIONER-BOOTED node=$NODE role=$ROLE version=$VERSION overlay=$OVERLAY hostname=$(hostname) ip=$IP"
if [ -n "$CALLBACK" ]; then
    n=0
    until wget -q -O /tmp/callback.out --post-data "role=$ROLE&version=$VERSION&token=$TOKEN" "$CALLBACK"; do
        n=$((n + 1))
        [ $((n % 10)) = 1 ] && say "callback to $CALLBACK failed; retrying"
        sleep 2
    done
    echo "PROVISIONER-CALLBACK-OK node=$NODE role=$ROLE version=$VERSION"
fi
# The test image only: what the site's overlay brings as /etc/provisioner/after-boot runs once the
# node is up (the tests play a user of the booted node with it); its output goes to the console.
if [ -x /etc/provisioner/after-boot ]; then
    /etc/provisioner/after-boot 2>&1 | sed 's/^/AFTER-BOOT: /'
fi
while :; do sleep 3600; done
