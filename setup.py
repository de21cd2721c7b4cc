"""prompt-transfer: soft prompt tuning and prompt transfer on frozen T5 (JAX/Flax)."""
import setuptools

setuptools.setup(
    name='prompt-transfer',
    version='0.1.0',
    description='Soft prompt tuning, SPoT, prompt transferability, FPT and IPT on frozen T5 '
                'models in JAX/Flax, with a T5X-style trainer.',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['prompt_transfer', 'prompt_transfer.*',
                                               'tasks', 'tasks.*']) + ['prompt_transfer.gin'],
    # The gin library lives at the top-level gin/ folder and installs as
    # prompt_transfer/gin so `--gin_file=prompts/from_file.gin` resolves anywhere.
    package_dir={'prompt_transfer.gin': 'gin'},
    package_data={'prompt_transfer.gin': ['*.gin', '*/*.gin', '*/*/*.gin'],
                  'prompt_transfer': ['assets/*/*'],
                  'tasks': ['data/*', 'data/*/*']},
    install_requires=[
        'jax>=0.4.30',
        'flax>=0.10',
        'optax>=0.2.3',
        'orbax-checkpoint>=0.6',
        'seqio>=0.0.19',
        'gin-config>=0.5',
        'tensorflow>=2.16',
        'tensorflow-datasets>=4.9',
        'sentencepiece',
        'safetensors>=0.4',
        'tensorstore>=0.1.60',
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
