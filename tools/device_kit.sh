#!/usr/bin/env bash
# Packs the build dependencies that a GPU machine without package access lacks (Eigen, Catch2,
# CLI11, nlohmann-json, fmt, libpng and pkg-config itself) from this Debian machine into .kit/,
# with relocatable pkg-config files. .kit/ is git-ignored; carry it to the GPU machine and run
# tools/gpu_session.sh there (docs/results/gpu.md tells the whole procedure).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.kit
rm -rf "$kit"
mkdir -p "$kit/include" "$kit/lib" "$kit/bin" "$kit/pkgconfig"

cp -r /usr/include/eigen3 /usr/include/catch2 /usr/include/CLI /usr/include/nlohmann /usr/include/fmt "$kit/include/"
cp /usr/include/png.h /usr/include/pngconf.h /usr/include/pnglibconf.h "$kit/include/"
lib=/usr/lib/x86_64-linux-gnu
cp -P "$lib"/libfmt.so* "$lib"/libpng16.so* "$kit/lib/"
cp -P /lib/x86_64-linux-gnu/libpkgconf.so* "$kit/lib/"
cp /usr/bin/pkgconf "$kit/bin/pkg-config"

# pkg-config files relative to their own folder, so the kit works wherever it lands.
pc() {  # name version cflags-suffix libs
  cat > "$kit/pkgconfig/$1.pc" <<EOF
prefix=\${pcfiledir}/..
Name: $1
Description: $1 (remat device kit)
Version: $2
Cflags: -I\${prefix}/include$3
Libs: $4
EOF
}
pc eigen3 3.4.0 /eigen3 ""
pc CLI11 2.1.2 "" ""
pc nlohmann_json 3.11.2 "" ""
pc fmt 9.1.0 "" "-L\${prefix}/lib -lfmt"
pc libpng 1.6.39 "" "-L\${prefix}/lib -lpng16"
pc catch2 2.13.10 /catch2 ""
du -sh "$kit"
