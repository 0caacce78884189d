#!/bin/sh
# busybox udhcpc configures nothing itself: it calls this with the lease in the environment.
case "$1" in
    deconfig)
        ifconfig "$interface" 0.0.0.0
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"}
        while route del default dev "$interface" 2>/dev/null; do :; done
        for r in $router; do
            route add default gw "$r" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        echo "$ip" > "/run/provisioner-ip.$interface"
        ;;
esac
exit 0
