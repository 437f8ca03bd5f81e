# What `cmake --install` puts where, by component:
#   runtime      libpolysample.so.* and the backend modules (CMAKE_INSTALL_LIBDIR)
#   development  polysample.h, libpolysample.so (or .a), polysample.pc and the
#                CMake package (polysampleConfig.cmake: polysample::polysample)
#   cli          bin/polysample (added in cli/CMakeLists.txt)
include(CMakePackageConfigHelpers)

set(PSM_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/polysample")

install(TARGETS polysample EXPORT polysampleTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime
          NAMELINK_COMPONENT development
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT development)
install(FILES "${PROJECT_SOURCE_DIR}/include/polysample.h"
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT development)
install(EXPORT polysampleTargets NAMESPACE polysample::
  DESTINATION "${PSM_INSTALL_CMAKEDIR}" COMPONENT development)

# A static core carries its dependencies to the consumer: the package
# config finds OpenMP and Threads again, pkg-config lists them as private.
if(BUILD_SHARED_LIBS)
  set(PSM_PACKAGE_DEPENDENCIES "")
  set(PSM_PC_LIBS_PRIVATE "")
else()
  set(PSM_PACKAGE_DEPENDENCIES "find_dependency(OpenMP COMPONENTS C)\nfind_dependency(Threads)")
  set(PSM_PC_LIBS_PRIVATE "${OpenMP_C_FLAGS} -lm")
  foreach(library IN LISTS CMAKE_DL_LIBS)
    string(APPEND PSM_PC_LIBS_PRIVATE " -l${library}")
  endforeach()
  string(APPEND PSM_PC_LIBS_PRIVATE " -lpthread")
endif()
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/polysampleConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/polysampleConfig.cmake"
  INSTALL_DESTINATION "${PSM_INSTALL_CMAKEDIR}")
# 0.x releases may break compatibility between minor versions.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/polysampleConfigVersion.cmake"
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/polysampleConfig.cmake"
              "${PROJECT_BINARY_DIR}/polysampleConfigVersion.cmake"
  DESTINATION "${PSM_INSTALL_CMAKEDIR}" COMPONENT development)

# The prefix relative to the .pc file, so that an installation can be moved
# (and installed with --prefix).
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(PSM_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  string(REGEX REPLACE "[^/]+" ".." psm_pc_up "${CMAKE_INSTALL_LIBDIR}/pkgconfig")
  set(PSM_PC_PREFIX "\${pcfiledir}/${psm_pc_up}")
endif()
configure_file("${PROJECT_SOURCE_DIR}/cmake/polysample.pc.in"
  "${PROJECT_BINARY_DIR}/polysample.pc" @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/polysample.pc"
  DESTINATION "${CMAKE_INSTALL_LIBDIR}/pkgconfig" COMPONENT development)
