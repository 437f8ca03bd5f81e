//! Finds libpolysample, or builds it, and tells Cargo how to link it.
//!
//! Three ways, tried in this order:
//! 1. `POLYSAMPLE_LIB_DIR`: the directory holding libpolysample.so (a build
//!    directory or an installed lib/). The header comes from
//!    `POLYSAMPLE_INCLUDE_DIR`, else `<lib dir>/../include`, else this
//!    repository's include/.
//! 2. pkg-config (`$PKG_CONFIG`, default `pkg-config`): an installed library
//!    with polysample.pc on the pkg-config path.
//! 3. CMake: this crate inside the polysample repository builds the library
//!    from the repository into OUT_DIR (extra configure arguments from
//!    `POLYSAMPLE_CMAKE_ARGS`, split on whitespace).
//!
//! Every way adds an rpath to the library's directory, so that this crate's
//! tests and examples run without LD_LIBRARY_PATH, and publishes it to
//! dependent build scripts as `DEP_POLYSAMPLE_LIB_DIR` (the link `metadata`
//! of `links = "polysample"`), with the header directory as
//! `DEP_POLYSAMPLE_INCLUDE`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const LIBRARY_FILE: &str = "libpolysample.so";

struct Found {
    lib_dirs: Vec<PathBuf>,
    libs: Vec<String>,
    include_dir: PathBuf,
}

fn main() {
    for variable in [
        "POLYSAMPLE_LIB_DIR",
        "POLYSAMPLE_INCLUDE_DIR",
        "POLYSAMPLE_CMAKE_ARGS",
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={variable}");
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let repository = manifest_dir.join("../../..");
    let repository = repository.canonicalize().unwrap_or(repository);

    let found = match from_environment(&repository) {
        Some(found) => found,
        None => match from_pkg_config() {
            Some(found) => found,
            None => from_cmake(&repository),
        },
    };

    for dir in &found.lib_dirs {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    for lib in &found.libs {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    if let Some(dir) = found.lib_dirs.first() {
        println!("cargo:lib_dir={}", dir.display());
    }
    println!("cargo:include={}", found.include_dir.display());
    // For tests/layout.rs, which compiles the header with the C compiler.
    println!("cargo:rustc-env=POLYSAMPLE_SYS_INCLUDE_DIR={}", found.include_dir.display());
}

fn from_environment(repository: &Path) -> Option<Found> {
    let lib_dir = PathBuf::from(env::var_os("POLYSAMPLE_LIB_DIR")?);
    if !lib_dir.join(LIBRARY_FILE).exists() {
        fail(&format!("POLYSAMPLE_LIB_DIR is {} but {LIBRARY_FILE} is not there", lib_dir.display()));
    }
    let include_dir = match env::var_os("POLYSAMPLE_INCLUDE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => [lib_dir.join("../include"), repository.join("include")]
            .into_iter()
            .find(|dir| dir.join("polysample.h").exists())
            .unwrap_or_else(|| {
                fail(&format!(
                    "POLYSAMPLE_LIB_DIR is {} but polysample.h is neither in {}/../include nor in \
                     this repository; set POLYSAMPLE_INCLUDE_DIR",
                    lib_dir.display(),
                    lib_dir.display()
                ))
            }),
    };
    if !include_dir.join("polysample.h").exists() {
        fail(&format!("POLYSAMPLE_INCLUDE_DIR is {} but polysample.h is not there", include_dir.display()));
    }
    println!("cargo:rerun-if-changed={}", lib_dir.join(LIBRARY_FILE).display());
    println!("cargo:rerun-if-changed={}", include_dir.join("polysample.h").display());
    Some(Found { lib_dirs: vec![lib_dir], libs: vec!["polysample".into()], include_dir })
}

/// Asks pkg-config; None when it is missing or does not know polysample.
fn from_pkg_config() -> Option<Found> {
    let program = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
    let output = Command::new(&program).args(["--libs", "--cflags", "polysample"]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let flags = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut lib_dirs = Vec::new();
    let mut libs = Vec::new();
    let mut include_dirs = Vec::new();
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            lib_dirs.push(PathBuf::from(dir));
        } else if let Some(lib) = flag.strip_prefix("-l") {
            libs.push(lib.to_string());
        } else if let Some(dir) = flag.strip_prefix("-I") {
            include_dirs.push(PathBuf::from(dir));
        }
    }
    // A library and header in the compiler's default paths come with no
    // -L or -I (pkg-config drops system directories).
    let include_dir = include_dirs
        .into_iter()
        .chain([PathBuf::from("/usr/local/include"), PathBuf::from("/usr/include")])
        .find(|dir| dir.join("polysample.h").exists())
        .unwrap_or_else(|| fail(&format!("`{program} --cflags polysample` names no directory holding polysample.h")));
    if !libs.iter().any(|lib| lib == "polysample") {
        fail(&format!("`{program} --libs polysample` gave `{}`, without -lpolysample", flags.trim()));
    }
    Some(Found { lib_dirs, libs, include_dir })
}

/// Configures and builds the repository's library into OUT_DIR.
fn from_cmake(repository: &Path) -> Found {
    if !repository.join("CMakeLists.txt").exists() || !repository.join("include/polysample.h").exists() {
        fail(&format!(
            "libpolysample was not found: POLYSAMPLE_LIB_DIR is unset, pkg-config does not know \
             polysample, and {} is not a polysample repository to build it from",
            repository.display()
        ));
    }
    for path in ["CMakeLists.txt", "include", "core", "backends"] {
        println!("cargo:rerun-if-changed={}", repository.join(path).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let build_dir = out_dir.join("cmake-build");
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(repository).arg("-B").arg(&build_dir).args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DPSM_BUILD_TESTS=OFF",
        "-DPSM_BUILD_CLI=OFF",
    ]);
    if let Ok(extra) = env::var("POLYSAMPLE_CMAKE_ARGS") {
        configure.args(extra.split_whitespace());
    }
    run(&mut configure, "configuring polysample with CMake");
    let jobs = env::var("NUM_JOBS").unwrap_or_else(|_| "1".into());
    run(
        Command::new("cmake").arg("--build").arg(&build_dir).args(["--parallel", &jobs]),
        "building polysample with CMake",
    );
    if !build_dir.join(LIBRARY_FILE).exists() {
        fail(&format!("CMake finished but {} has no {LIBRARY_FILE}", build_dir.display()));
    }
    Found { lib_dirs: vec![build_dir], libs: vec!["polysample".into()], include_dir: repository.join("include") }
}

/// Runs a CMake step with its output captured (a build script's stdout is
/// read by Cargo), showing the end of it if the step fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| fail(&format!("{what}: could not run {:?}: {error}", command.get_program())));
    if !output.status.success() {
        let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
        log.push_str(&String::from_utf8_lossy(&output.stderr));
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        fail(&format!("{what}: {command:?} failed with {}:\n{tail}", output.status));
    }
}

fn fail(message: &str) -> ! {
    panic!(
        "\npolysample-sys: {message}\n\
         Link polysample in one of three ways: set POLYSAMPLE_LIB_DIR (and POLYSAMPLE_INCLUDE_DIR), \
         install it with polysample.pc on the pkg-config path, or build this crate inside the \
         polysample repository (needs cmake and a C compiler).\n"
    )
}
