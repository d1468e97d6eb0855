#!/bin/busybox sh
# The VM tests' /init: loads vivid and the other test drivers, runs every case in /cases,
# writes the results as a tar stream onto the raw virtio disk, and powers off.
# Case lines: NAME|ENV ASSIGNMENTS|COMMAND|KIND (plain, fault, mplane: plain after
# reloading vicodec with multiplanar=1, or "feed FEEDER COMMAND": plain while the feeder runs
# in the background, started first, its output in /out/NAME.feed.json and .feed.log); a
# case's standard output goes to /out/NAME.json, its standard error to /out/NAME.log, its exit
# code to /out/NAME.rc.
/bin/busybox mkdir -p /proc /sys /dev /tmp /out /usr/bin /sbin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "vmtest: $*"; }
# Wall-clock milliseconds (busybox date has no %N; adjtimex only reads the clock here).
now_ms() { adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%d%03d\n", s, u / 1000 }'; }

say "kernel $(uname -r) on $(uname -m), $(grep -c ^processor /proc/cpuinfo) cpu"
# Each module's insmod result goes to /out/modules.txt; the host fails the run by name when
# one did not load or its device nodes are missing (see /out/nodes.txt).
while read -r mod args; do
    # shellcheck disable=SC2086
    insmod "/modules/$mod" $args 2>>/out/insmod.log
    rc=$?
    echo "${mod%.ko} $rc" >>/out/modules.txt
    [ $rc = 0 ] || say "insmod $mod failed ($rc): $(tail -1 /out/insmod.log)"
done </modules/order
i=0
while [ ! -e /dev/video0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/video0 ] || say "FAIL: /dev/video0 did not appear"
say "/dev/video0 ready after $(cut -d' ' -f1 /proc/uptime) s of uptime"
# The V4L2 and media-controller nodes the drivers created (node, name / model).
for d in /sys/class/video4linux/*; do
    [ -e "$d/name" ] && echo "v4l2 /dev/${d##*/} $(cat "$d/name")" >>/out/nodes.txt
done
for d in /sys/bus/media/devices/*; do
    [ -e "$d/model" ] && echo "media /dev/${d##*/} $(cat "$d/model")" >>/out/nodes.txt
done
say "nodes: $(awk '{ print $2 }' /out/nodes.txt | tr '\n' ' ')"
# There is no udevd here, and libcamera enumerates only devices udev has initialised: write
# the (empty) udev database entries udevd would, for the media and V4L2 nodes.
mkdir -p /run/udev/data
for d in /sys/bus/media/devices/* /sys/class/video4linux/*; do
    [ -e "$d/dev" ] && echo "I:1" >"/run/udev/data/c$(cat "$d/dev")"
done
# Stable names for the cases (no udev here): /dev/by-name/<node name, spaces and / as ->.
mkdir -p /dev/by-name
while read -r kind node name; do
    [ "$kind" = v4l2 ] && ln -s "$node" "/dev/by-name/$(echo "$name" | tr ' /' '--')"
done </out/nodes.txt
VIVID=/sys/bus/platform/drivers/vivid

run_fault() { # name command...: run while vivid is unbound for 2 s, then bound again
    name=$1; shift
    "$@" >"/out/$name.json" 2>"/out/$name.log" &
    pid=$!
    # Capture runs once the camera is opened after the controls were set (setting a control
    # opens the camera briefly, without capturing, when nothing streams yet).
    capturing() {
        awk '/control set/ { c = 1 } c && /camera opened/ { found = 1 } END { exit !found }' "/out/$name.log"
    }
    i=0
    while ! capturing && kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do
        sleep 0.1; i=$((i + 1))
    done
    sleep 1.5
    now_ms >"/out/$name.gone_ms"
    echo vivid.0 >"$VIVID/unbind" && say "$name: vivid.0 unbound (camera gone)"
    sleep 2
    echo vivid.0 >"$VIVID/bind" && say "$name: vivid.0 bound again"
    i=0
    while [ ! -e /dev/video0 ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i + 1)); done
    now_ms >"/out/$name.back_ms"
    wait $pid
    echo $? >"/out/$name.rc"
}

while IFS='|' read -r name envs command kind; do
    [ -n "$name" ] || continue
    start=$(now_ms)
    feeder=
    case "$kind" in feed\ *) feeder=${kind#feed }; kind=plain ;; esac
    if [ -n "$feeder" ]; then
        # shellcheck disable=SC2086
        $feeder >"/out/$name.feed.json" 2>"/out/$name.feed.log" &
        fpid=$!
        i=0
        while [ ! -s "/out/$name.feed.json" ] && kill -0 $fpid 2>/dev/null && [ $i -lt 100 ]; do
            sleep 0.1; i=$((i + 1))
        done
        # rtcam starts mid-stream, between the clip's IDRs.
        sleep 1.2
    fi
    if [ "$kind" = mplane ]; then
        # vicodec again, in its multi-planar mode (the API bcm2835-codec uses).
        rmmod vicodec && insmod /modules/vicodec.ko multiplanar=1 \
            || say "$name: reloading vicodec with multiplanar=1 failed"
        kind=plain
    fi
    if [ "$kind" = fault ]; then
        # shellcheck disable=SC2086
        export $envs
        # shellcheck disable=SC2086
        run_fault "$name" $command
        for kv in $envs; do unset "${kv%%=*}"; done
    else
        # shellcheck disable=SC2086
        env $envs $command >"/out/$name.json" 2>"/out/$name.log"
        echo $? >"/out/$name.rc"
    fi
    if [ -n "$feeder" ]; then
        kill "$fpid" 2>/dev/null
        wait "$fpid"
    fi
    say "$name: exit $(cat "/out/$name.rc") in $(($(now_ms) - start)) ms"
done </cases

cp /proc/uptime /out/uptime
cp /proc/devices /out/proc-devices.txt
dmesg >/out/dmesg.txt
tar -C /out -cf /dev/vda . && sync && say "results written"
poweroff -f
