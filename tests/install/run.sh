#!/usr/bin/env bash
# Installs a built polysample into a temporary prefix and uses it as a
# newcomer would: the installed tool runs; a CMake project (find_package) and
# a pkg-config build consume it; the README's C example builds and runs; the
# core library exports only psm_ symbols and needs no vendor runtime; a
# missing or unloadable backend module is a reason, not a failure; and a
# static core installs and links the same ways.
#
# usage: run.sh <source dir> <build dir> <work dir>   (ctest: install_and_consume)
set -euo pipefail
source_dir=$1 build_dir=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix
failures=0
step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }
# The installed tree must work without the build tree's environment.
unset LD_LIBRARY_PATH POLYSAMPLE_BACKEND_PATH POLYSAMPLE_BACKEND

step "install into $prefix"
cmake --install "$build_dir" --prefix "$prefix" >"$work/install.log"
libdir=$(cd "$prefix" && dirname "$(find . -name 'libpolysample.so.0' | head -n 1)")
libdir=$prefix/${libdir#./}
for file in include/polysample.h bin/polysample; do
    [[ -e $prefix/$file ]] || fail "$file not installed"
done
for file in libpolysample.so libpolysample.so.0 pkgconfig/polysample.pc \
    cmake/polysample/polysampleConfig.cmake cmake/polysample/polysampleConfigVersion.cmake; do
    [[ -e $libdir/$file ]] || fail "$libdir/$file not installed"
done
modules=()
for module in "$build_dir"/libpolysample-*.so; do
    [[ -e $module ]] || continue
    modules+=("$(basename "$module")")
    [[ -e $libdir/$(basename "$module") ]] || fail "module $(basename "$module") not installed"
done
printf 'modules: %s\n' "${modules[*]:-none}"

step "the installed tool runs (relative RUNPATH)"
"$prefix/bin/polysample" info >"$work/info.txt" || fail "installed polysample info failed"
grep -q '^auto: ' "$work/info.txt" || fail "installed polysample info printed no AUTO choice"
# AUTO leaves OpenCL CPU devices (PoCL) to the CPU backend.
if grep -q '^opencl .* yes .*only CPU device' "$work/info.txt" &&
    ! grep -q -E '^(cuda|hip) +yes +yes' "$work/info.txt"; then
    grep -q '^auto: cpu ' "$work/info.txt" ||
        fail "AUTO did not pick the CPU backend where OpenCL has only CPU devices: $(grep '^auto:' "$work/info.txt")"
    printf 'AUTO with only PoCL for OpenCL: %s\n' "$(grep '^auto:' "$work/info.txt")"
fi

step "exports and dependencies of the core library"
unexpected=$(nm -D --defined-only "$libdir/libpolysample.so.0" | awk '{print $3}' | grep -v '^psm_' || true)
[[ -z $unexpected ]] || fail "libpolysample exports non-psm_ symbols: $(echo $unexpected | head -c 300)"
nm -D --defined-only "$libdir/libpolysample.so.0" | grep -q ' psm_sample$' ||
    fail "libpolysample does not export psm_sample"
needed=$(readelf -d "$libdir/libpolysample.so.0" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
printf 'core NEEDED: %s\n' "$(echo $needed)"
if grep -E -i 'cuda|nvrtc|amdhip|hiprtc|OpenCL' <<<"$needed"; then
    fail "the core library needs a vendor runtime"
fi
for module in "${modules[@]}"; do
    exported=$(nm -D --defined-only "$libdir/$module" | awk '{print $3}')
    [[ $exported == psm_backend_module_entry ]] ||
        fail "$module exports more than its entry point: $(echo $exported | head -c 300)"
done

step "a CMake project: find_package(polysample)"
if cmake -S "$source_dir/tests/install/consumer" -B "$work/cmake-consumer" \
    -DCMAKE_PREFIX_PATH="$prefix" >"$work/cmake-consumer.log" 2>&1 &&
    cmake --build "$work/cmake-consumer" >>"$work/cmake-consumer.log" 2>&1; then
    "$work/cmake-consumer/consumer" || fail "find_package consumer ran wrong"
else
    tail -n 20 "$work/cmake-consumer.log"
    fail "find_package consumer did not build"
fi

step "a pkg-config build"
export PKG_CONFIG_PATH=$libdir/pkgconfig
if cc -std=c11 -o "$work/pc-consumer" "$source_dir/tests/install/consumer/consumer.c" \
    $(pkg-config --cflags --libs polysample) \
    "-Wl,-rpath,$(pkg-config --variable=libdir polysample)"; then
    "$work/pc-consumer" || fail "pkg-config consumer ran wrong"
else
    fail "pkg-config consumer did not build"
fi

step "the README's C example"
# The first ```c block of README.md, built as it stands.
awk '/^```c$/ {inside = 1; next} inside && /^```$/ {exit} inside {print}' \
    "$source_dir/README.md" >"$work/readme_example.c"
[[ -s $work/readme_example.c ]] || fail "README.md has no \`\`\`c block"
if cc -std=c11 -Wall -Werror -o "$work/readme-example" "$work/readme_example.c" \
    $(pkg-config --cflags --libs polysample) -lm "-Wl,-rpath,$libdir"; then
    POLYSAMPLE_BACKEND=cpu "$work/readme-example" >"$work/readme-example.txt" ||
        fail "the README example exited with failure"
    cat "$work/readme-example.txt"
else
    fail "the README example does not compile"
fi
unset PKG_CONFIG_PATH

step "a missing module is a reason, not a failure"
cp -a "$prefix" "$work/prefix-missing"
victim=${modules[0]:-}
if [[ -n $victim ]]; then
    name=${victim#libpolysample-}
    name=${name%.so}
    rm "$work/prefix-missing/${libdir#$prefix/}/$victim"
    "$work/prefix-missing/bin/polysample" info >"$work/info-missing.txt" ||
        fail "polysample info fails when $victim is missing"
    grep -q "^$name .*module $victim not found" "$work/info-missing.txt" ||
        fail "info does not say that $victim is missing: $(grep "^$name " "$work/info-missing.txt")"
    if POLYSAMPLE_BACKEND=$name "$work/prefix-missing/bin/polysample" info \
        >"$work/info-named.txt" 2>&1; then
        fail "POLYSAMPLE_BACKEND=$name succeeded without its module"
    fi
    grep -q "not found" "$work/info-named.txt" ||
        fail "naming a missing backend does not say why: $(tail -n 1 "$work/info-named.txt")"

    step "a module whose runtime is missing is a reason, not a failure"
    mkdir -p "$work/broken"
    printf 'int psm_fake_runtime_call(void) { return 0; }\n' >"$work/broken/runtime.c"
    printf 'int psm_fake_runtime_call(void);\nint psm_backend_module_entry(void) { return psm_fake_runtime_call(); }\n' \
        >"$work/broken/module.c"
    cc -shared -fPIC -o "$work/broken/libpsm-vanished-runtime.so" "$work/broken/runtime.c"
    cc -shared -fPIC -o "$work/broken/$victim" "$work/broken/module.c" \
        -L"$work/broken" -lpsm-vanished-runtime
    rm "$work/broken/libpsm-vanished-runtime.so"
    POLYSAMPLE_BACKEND_PATH=$work/broken "$prefix/bin/polysample" info >"$work/info-broken.txt" ||
        fail "polysample info fails when $victim cannot be loaded"
    grep -q "^$name .*cannot load .*libpsm-vanished-runtime.so" "$work/info-broken.txt" ||
        fail "info does not give the loader's reason: $(grep "^$name " "$work/info-broken.txt")"
else
    printf 'SKIP missing-module checks: this build has no GPU backend module\n'
fi

step "a static core: build, install, find_package and pkg-config --static"
static_build=$work/static-build static_prefix=$work/static-prefix
if cmake -S "$source_dir" -B "$static_build" -DBUILD_SHARED_LIBS=OFF -DPSM_BUILD_TESTS=OFF \
    -DPSM_BUILD_CLI=OFF -DPSM_WITH_CUDA=OFF -DPSM_WITH_HIP=OFF -DPSM_WITH_OPENCL=OFF \
    >"$work/static.log" 2>&1 &&
    cmake --build "$static_build" --parallel 2 >>"$work/static.log" 2>&1 &&
    cmake --install "$static_build" --prefix "$static_prefix" >>"$work/static.log" 2>&1; then
    static_libdir=$(dirname "$(find "$static_prefix" -name libpolysample.a | head -n 1)")
    [[ ! -e $static_libdir/libpolysample.so ]] || fail "the static build installed a shared library"
    if cmake -S "$source_dir/tests/install/consumer" -B "$work/static-consumer" \
        -DCMAKE_PREFIX_PATH="$static_prefix" >>"$work/static.log" 2>&1 &&
        cmake --build "$work/static-consumer" >>"$work/static.log" 2>&1; then
        "$work/static-consumer/consumer" || fail "static find_package consumer ran wrong"
    else
        tail -n 20 "$work/static.log"
        fail "static find_package consumer did not build"
    fi
    export PKG_CONFIG_PATH=$static_libdir/pkgconfig
    if cc -std=c11 -o "$work/static-pc-consumer" "$source_dir/tests/install/consumer/consumer.c" \
        $(pkg-config --static --cflags --libs polysample); then
        "$work/static-pc-consumer" || fail "static pkg-config consumer ran wrong"
    else
        fail "static pkg-config consumer did not build"
    fi
    unset PKG_CONFIG_PATH
else
    tail -n 20 "$work/static.log"
    fail "the static core did not build or install"
fi

if (( failures > 0 )); then
    printf 'install_and_consume: %d failure(s)\n' "$failures"
    exit 1
fi
printf 'install_and_consume: all passed\n'
