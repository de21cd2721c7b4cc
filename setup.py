"""prompt-transfer: soft prompt tuning and prompt transfer on frozen T5 (JAX/Flax)."""
import setuptools

setuptools.setup(
    name='prompt-transfer',
    version='0.1.0',
    description='Soft prompt tuning, SPoT, prompt transferability, FPT and IPT on frozen T5 '
                'models in JAX/Flax, with a T5X-style trainer.',
    # Lower bounds are what the suite was run with (constraints.txt pins the
    # exact versions); Python 3.11 is the version tested (current JAX needs it
    # anyway; launch/tpu_vm.sh brings it to TPU VMs, whose images have 3.10).
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['prompt_transfer', 'prompt_transfer.*',
                                               'tasks', 'tasks.*']) + ['prompt_transfer.gin'],
    # The gin library lives at the top-level gin/ folder and installs as
    # prompt_transfer/gin so `--gin_file=prompts/from_file.gin` resolves anywhere.
    package_dir={'prompt_transfer.gin': 'gin'},
    package_data={'prompt_transfer.gin': ['*.gin', '*/*.gin', '*/*/*.gin'],
                  'prompt_transfer': ['assets/*/*'],
                  'tasks': ['data/*', 'data/*/*']},
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'seqio>=0.0.20',
        'gin-config>=0.5',
        'tensorflow>=2.21',
        'tensorflow-datasets>=4.9.10',
        'sentencepiece',
        'safetensors>=0.8',
        'tensorstore>=0.1.86',
        'msgpack',
        'numpy',
        'scipy',
        'scikit-learn',
        'rouge-score',
        'aiohttp>=3.9',  # t5x serve: the HTTP server and its micro-batching event loop
        'matplotlib',
        'tensorboard',
    ],
    extras_require={
        # torch's CPU build is what the parity tests compare against.
        # gcsfs + a local GCS emulator: the gs:// MODEL_DIR / PROMPT_FILE test.
        # peft: the PEFT prompt-adapter interchange tests (tests/test_peft_format.py).
        'test': ['pytest>=8', 'pytest-xdist', 'torch==2.13.0', 'transformers>=4.40', 'peft>=0.4',
                 'gcsfs', 'gcp-storage-emulator'],
        'bench': ['torch==2.13.0', 'transformers>=4.40', 'peft', 'psutil'],
    },
    entry_points={'console_scripts': [
        't5x=prompt_transfer.cli:main',
        'prompt-transfer=prompt_transfer.cli:main',
    ]},
)
