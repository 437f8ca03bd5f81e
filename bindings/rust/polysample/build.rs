//! polysample-sys's rpath reaches only its own targets; this repeats it for
//! this crate's tests, doctests and examples, so that they find
//! libpolysample.so without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_POLYSAMPLE_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_POLYSAMPLE_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
