//! The library-wide queries.

use polysample::{backends, version, version_number, Backend};

#[test]
fn the_version_is_the_headers() {
    let sys = polysample::sys::PSM_VERSION_NUMBER;
    assert_eq!(version_number(), sys);
    let expected = format!(
        "{}.{}.{}",
        polysample::sys::PSM_VERSION_MAJOR,
        polysample::sys::PSM_VERSION_MINOR,
        polysample::sys::PSM_VERSION_PATCH
    );
    assert_eq!(version(), expected);
}

#[test]
fn backends_lists_the_four_with_the_cpu_available() {
    let list = backends();
    let names: Vec<&str> = list.iter().map(|info| info.backend.name()).collect();
    assert_eq!(names, ["cpu", "cuda", "hip", "opencl"]);
    let cpu = &list[0];
    assert!(cpu.compiled && cpu.available && cpu.device_count == 1, "{cpu:?}");
    for info in &list {
        assert!(!info.reason.is_empty(), "{:?} gives no reason", info.backend);
        if !info.compiled {
            assert!(!info.available, "{info:?}");
        }
        if !info.available {
            assert_eq!(info.device_count, 0, "{info:?}");
        }
    }
}

#[test]
fn backend_names_parse_back() {
    for backend in [Backend::Auto, Backend::Cpu, Backend::Cuda, Backend::Hip, Backend::Opencl] {
        assert_eq!(backend.name().parse::<Backend>(), Ok(backend));
        assert_eq!(Backend::from_raw(backend.raw()), Some(backend));
        assert_eq!(backend.to_string(), backend.name());
    }
    assert!("vulkan".parse::<Backend>().is_err());
    assert_eq!(Backend::from_raw(77), None);
}
