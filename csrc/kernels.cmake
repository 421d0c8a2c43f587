# The torch-free kernel library (static, position-independent), included by the top-level
# CMakeLists.txt and by csrc/tests/CMakeLists.txt. One translation unit per instruction set, each
# with its own flags; nothing is compiled for the build machine's CPU (-march=native is never used).
set(LWK_CSRC_DIR ${CMAKE_CURRENT_LIST_DIR})

add_library(lwkernels_core STATIC
  ${LWK_CSRC_DIR}/buffer_pool.cpp
  ${LWK_CSRC_DIR}/call_sequence.cpp
  ${LWK_CSRC_DIR}/conv_geometry.cpp
  ${LWK_CSRC_DIR}/dense_conv.cpp
  ${LWK_CSRC_DIR}/forward_call.cpp
  ${LWK_CSRC_DIR}/inverted_residual.cpp
  ${LWK_CSRC_DIR}/joint_block.cpp
  ${LWK_CSRC_DIR}/tiling.cpp
  ${LWK_CSRC_DIR}/transpose.cpp
  ${LWK_CSRC_DIR}/parallel.cpp
  ${LWK_CSRC_DIR}/host_openmp.cpp
  ${LWK_CSRC_DIR}/thread_pool.cpp
  ${LWK_CSRC_DIR}/parallel_session.cpp
  ${LWK_CSRC_DIR}/isa_scalar.cpp
  ${LWK_CSRC_DIR}/train_kernels.cpp)
set_target_properties(lwkernels_core PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_compile_features(lwkernels_core PUBLIC cxx_std_17)
target_include_directories(lwkernels_core PUBLIC ${LWK_CSRC_DIR})

find_package(Threads REQUIRED)
target_link_libraries(lwkernels_core PUBLIC Threads::Threads ${CMAKE_DL_LIBS})  # dl: host_openmp.cpp

string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" LWK_ARCH)
if(LWK_ARCH MATCHES "^(x86_64|amd64|x64)$")
  target_sources(lwkernels_core PRIVATE ${LWK_CSRC_DIR}/isa_avx2.cpp)
  if(MSVC)
    set_source_files_properties(${LWK_CSRC_DIR}/isa_avx2.cpp PROPERTIES COMPILE_OPTIONS "/arch:AVX2")
  else()
    set_source_files_properties(${LWK_CSRC_DIR}/isa_avx2.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
  endif()
  target_compile_definitions(lwkernels_core PRIVATE LWK_HAVE_AVX2=1)
  # Training kernels: the same flags for their AVX2 variant.
  target_sources(lwkernels_core PRIVATE ${LWK_CSRC_DIR}/train_kernels_avx2.cpp)
  if(MSVC)
    set_source_files_properties(${LWK_CSRC_DIR}/train_kernels_avx2.cpp PROPERTIES COMPILE_OPTIONS "/arch:AVX2")
  else()
    set_source_files_properties(${LWK_CSRC_DIR}/train_kernels_avx2.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
  endif()
  # AVX-512F. MSVC has no flag for AVX-512F alone; /arch:AVX512 also assumes CD, BW, DQ and VL,
  # which the run-time check does not require, so MSVC builds leave this path out.
  if(NOT MSVC)
    target_sources(lwkernels_core PRIVATE ${LWK_CSRC_DIR}/isa_avx512.cpp)
    set_source_files_properties(${LWK_CSRC_DIR}/isa_avx512.cpp PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mavx512f")
    target_compile_definitions(lwkernels_core PRIVATE LWK_HAVE_AVX512=1)
  endif()
elseif(LWK_ARCH MATCHES "^(aarch64|arm64)$")
  target_sources(lwkernels_core PRIVATE ${LWK_CSRC_DIR}/isa_neon.cpp)
  target_compile_definitions(lwkernels_core PRIVATE LWK_HAVE_NEON=1)
endif()

if(NOT MSVC)
  # Kernels are hot loops: build them optimised even in Debug configurations of a parent project.
  target_compile_options(lwkernels_core PRIVATE $<$<CONFIG:Debug>:-O2> -fno-math-errno)
endif()
